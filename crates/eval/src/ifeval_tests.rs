//! Pass and fail cases for every IFEval checker.

use super::*;
use serde_json::json;

fn t(id: &str, kw: Value, pass: &str, fail: &str) {
    assert_eq!(
        check(id, &kw, pass),
        Ok(true),
        "{id} should pass on {pass:?}"
    );
    assert_eq!(
        check(id, &kw, fail),
        Ok(false),
        "{id} should fail on {fail:?}"
    );
}

#[test]
fn keywords() {
    t(
        "keywords:existence",
        json!({"keywords": ["Rain", "cloud"]}),
        "The rain fell from a CLOUD.",
        "The rain fell.",
    );
    t(
        "keywords:frequency",
        json!({"keyword": "cat", "frequency": 2, "relation": "at least"}),
        "Cat and cat.",
        "One cat.",
    );
    t(
        "keywords:frequency",
        json!({"keyword": "dog", "frequency": 2, "relation": "less than"}),
        "A dog.",
        "Dog dog.",
    );
    t(
        "keywords:forbidden_words",
        json!({"forbidden_words": ["bad", "evil"]}),
        "A badge is fine.",
        "This is Bad.",
    );
    t(
        "keywords:letter_frequency",
        json!({"letter": "z", "let_frequency": 3, "let_relation": "at least"}),
        "Zzz!",
        "zoo",
    );
    t(
        "keywords:letter_frequency",
        json!({"letter": "a", "let_frequency": 2, "let_relation": "less than"}),
        "a b",
        "banana",
    );
}

#[test]
fn language() {
    let kw = json!({"language": "en"});
    t(
        "language:response_language",
        kw,
        "This is a sentence in English and it is fine.",
        "Das ist ein Satz auf Deutsch und nicht auf Englisch.",
    );
    t(
        "language:response_language",
        json!({"language": "ru"}),
        "Это предложение на русском языке.",
        "This is English.",
    );
    t(
        "language:response_language",
        json!({"language": "hi"}),
        "यह एक वाक्य है।",
        "Это русский.",
    );
    t("language:response_language", json!({"language": "fa"}), "\u{067E}\u{062F}\u{0631} \u{0648} \u{06AF}\u{0644} \u{0686}\u{06CC}\u{062F}\u{0646}\u{062F}", "هذه جملة باللغة العربية");
    assert_eq!(detect_language("12345 !!!"), None);
    assert_eq!(detect_language("日本語のテキストです"), Some("ja".into()));
    assert_eq!(detect_language("这是中文"), Some("zh-cn".into()));
    assert_eq!(
        detect_language("Ceci est une phrase en français et elle est pour le test."),
        Some("fr".into())
    );
}

#[test]
fn length_constraints() {
    t(
        "length_constraints:number_sentences",
        json!({"num_sentences": 3, "relation": "at least"}),
        "One. Two! Three?",
        "One. Two.",
    );
    t(
        "length_constraints:number_sentences",
        json!({"num_sentences": 2, "relation": "less than"}),
        "Dr. Smith arrived.",
        "One. Two.",
    );
    assert_eq!(
        split_into_sentences("Mr. Smith went to Washington. He saw 3.5 cats... Then left!").len(),
        3
    );
    t(
        "length_constraints:number_paragraphs",
        json!({"num_paragraphs": 2}),
        "First.\n***\nSecond.",
        "First.\n***\n***\nSecond.",
    );
    t(
        "length_constraints:number_paragraphs",
        json!({"num_paragraphs": 2}),
        "***\nA\n***\nB\n***",
        "Only one.",
    );
    t(
        "length_constraints:number_words",
        json!({"num_words": 5, "relation": "at least"}),
        "one two three four five",
        "one two",
    );
    t(
        "length_constraints:number_words",
        json!({"num_words": 3, "relation": "less than"}),
        "one, two",
        "one two three",
    );
    let kw = json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"});
    t(
        "length_constraints:nth_paragraph_first_word",
        kw.clone(),
        "Start here.\n\n\"Then, it ended.",
        "Start here.\n\nNow it ended.",
    );
    assert_eq!(
        check(
            "length_constraints:nth_paragraph_first_word",
            &kw,
            "Then only one."
        ),
        Ok(false)
    );
}

#[test]
fn detectable_content_and_format() {
    t(
        "detectable_content:number_placeholders",
        json!({"num_placeholders": 2}),
        "Dear [name], at [address].",
        "Dear [name].",
    );
    t(
        "detectable_content:postscript",
        json!({"postscript_marker": "P.S."}),
        "Hello.\nP.S. bye",
        "Hello. PS bye",
    );
    t(
        "detectable_content:postscript",
        json!({"postscript_marker": "P.P.S"}),
        "Hi\np. p. s. more",
        "Hi\nP.S. more",
    );
    t(
        "detectable_content:postscript",
        json!({"postscript_marker": "Note"}),
        "Hi\nNOTE: x",
        "Hi there",
    );
    t(
        "detectable_format:number_bullet_lists",
        json!({"num_bullets": 2}),
        "* one\n- two\nend",
        "* one\n* two\n* three",
    );
    t(
        "detectable_format:constrained_response",
        json!({}),
        "  My answer is maybe. ",
        "My answer is perhaps.",
    );
    t(
        "detectable_format:number_highlighted_sections",
        json!({"num_highlights": 2}),
        "*one* and **two**",
        "*one* and * *",
    );
    t(
        "detectable_format:multiple_sections",
        json!({"section_spliter": "Section", "num_sections": 2}),
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA",
    );
    t(
        "detectable_format:json_format",
        json!({}),
        "```json\n{\"a\": [1, 2]}\n```",
        "{\"a\": 1,}",
    );
    t(
        "detectable_format:title",
        json!({}),
        "<<My Poem>>\nroses",
        "<< >> no title",
    );
}

#[test]
fn combination_startend_case_punctuation() {
    t(
        "combination:two_responses",
        json!({}),
        "Answer one.\n******\nAnswer two.",
        "Same.\n******\nSame.",
    );
    t(
        "combination:repeat_prompt",
        json!({"prompt_to_repeat": "Write a poem."}),
        " write a POEM. Here it is.",
        "Here is a poem.",
    );
    t(
        "startend:end_checker",
        json!({"end_phrase": "Any other questions?"}),
        "Done. any other questions?\"",
        "Any other questions? Yes.",
    );
    t(
        "change_case:capital_word_frequency",
        json!({"capital_frequency": 2, "capital_relation": "at least"}),
        "The NASA and ESA-LED plan",
        "The NASA plan",
    );
    t(
        "change_case:capital_word_frequency",
        json!({"capital_frequency": 2, "capital_relation": "less than"}),
        "One BIG word",
        "TWO BIG words",
    );
    t(
        "change_case:english_capital",
        json!({}),
        "THIS IS ALL IN CAPITAL LETTERS AND IT IS ENGLISH.",
        "This is not all capitals.",
    );
    t(
        "change_case:english_lowercase",
        json!({}),
        "this is all lowercase and it is english.",
        "This has a capital.",
    );
    t(
        "punctuation:no_comma",
        json!({}),
        "No commas here.",
        "One, two.",
    );
    t(
        "startend:quotation",
        json!({}),
        " \"Quoted text.\" ",
        "\"Unclosed",
    );
}

#[test]
fn strict_and_loose() {
    // Loose passes when the first line (a preamble) is dropped; strict does not.
    let ids = vec![
        "startend:quotation".to_string(),
        "punctuation:no_comma".to_string(),
    ];
    let kws = vec![json!({}), json!({})];
    let (s, l) = evaluate(&ids, &kws, "Sure, here it is:\n\"A quote\"").unwrap();
    assert_eq!(s, vec![false, false]);
    assert_eq!(l, vec![true, true]);
    // Empty responses never follow.
    let (s, l) = evaluate(&ids[1..], &kws[1..], "   ").unwrap();
    assert_eq!((s, l), (vec![false], vec![false]));
    assert!(check("nope:nothing", &json!({}), "x").is_err());
    assert!(check("keywords:frequency", &json!({"keyword": "a"}), "x").is_err());
    assert_eq!(INSTRUCTIONS.len(), 25);
    // Every registered id is checked (no "unknown instruction").
    for id in INSTRUCTIONS {
        let r = check(id, &json!({}), "x");
        assert!(!matches!(&r, Err(e) if e.starts_with("unknown")), "{id}");
    }
}
