//! IFEval's verifiable instructions (Zhou et al. 2023), ported from google-research's
//! `instruction_following_eval/instructions.py`: all 25 registered instruction types, with the
//! strict test (the response as given) and the loose test (also with the first and/or last line
//! removed and/or `*` removed; any variant passing counts).
//!
//! NLTK's sentence splitter and word tokenizer (sentence counts, all-capital word counts) are
//! ported in [`crate::punkt`] with NLTK's english Punkt parameters. Language detection
//! (langdetect, a naive Bayes model over character n-gram profiles of 55 languages, randomised
//! unless seeded) is reproduced exactly (up to its sampling noise) for text without lowercase
//! letters ([`detect_language_caps`]) and approximated by a script + stop-word heuristic
//! otherwise ([`detect_language`]). Agreement with lm-evaluation-harness's implementation is tested on a fixture of responses
//! (`tests/ifeval_reference.rs`).

use regex::Regex;
use serde_json::Value;

/// Every instruction id this module checks (all 25 of IFEval's registry).
pub const INSTRUCTIONS: [&str; 25] = [
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:quotation",
];

fn rx(p: &str) -> Regex {
    Regex::new(p).unwrap_or_else(|_| Regex::new(&regex::escape(p)).expect("escaped regex"))
}

fn kw_str(kw: &Value, key: &str) -> Result<String, String> {
    kw.get(key)
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| format!("missing string argument '{key}'"))
}

fn kw_int(kw: &Value, key: &str) -> Result<i64, String> {
    kw.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("missing integer argument '{key}'"))
}

fn kw_list(kw: &Value, key: &str) -> Result<Vec<String>, String> {
    kw.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .ok_or_else(|| format!("missing list argument '{key}'"))
}

/// "less than" → count < n; "at least" → count ≥ n.
fn relation(rel: &str, count: i64, n: i64) -> Result<bool, String> {
    match rel {
        "less than" => Ok(count < n),
        "at least" => Ok(count >= n),
        other => Err(format!(
            "relation must be 'less than' or 'at least', got '{other}'"
        )),
    }
}

/// Python's str.isupper / str.islower (at least one cased character, all of one case).
pub fn is_upper(s: &str) -> bool {
    s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase)
}
pub fn is_lower(s: &str) -> bool {
    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)
}

/// IFEval's `count_words`: tokens of `\w+`.
pub fn count_words(s: &str) -> usize {
    static R: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    R.get_or_init(|| Regex::new(r"\w+").expect("regex"))
        .find_iter(s)
        .count()
}

/// IFEval's rule-based `split_into_sentences`.
pub fn split_into_sentences(text: &str) -> Vec<String> {
    const ALPHA: &str = "([A-Za-z])";
    const PREFIXES: &str = "(Mr|St|Mrs|Ms|Dr)[.]";
    const SUFFIXES: &str = "(Inc|Ltd|Jr|Sr|Co)";
    const STARTERS: &str = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)";
    const ACRONYMS: &str = "([A-Z][.][A-Z][.](?:[A-Z][.])?)";
    const WEBSITES: &str = "[.](com|net|org|io|gov|edu|me)";
    const DIGITS: &str = "([0-9])";
    let sub = |t: &str, pat: &str, rep: &str| -> String {
        Regex::new(pat)
            .expect("regex")
            .replace_all(t, rep)
            .into_owned()
    };
    let mut t = format!(" {text}  ").replace('\n', " ");
    t = sub(&t, PREFIXES, "${1}<prd>");
    t = sub(&t, WEBSITES, "<prd>${1}");
    t = sub(&t, &format!("{DIGITS}[.]{DIGITS}"), "${1}<prd>${2}");
    t = Regex::new(r"\.{2,}")
        .expect("regex")
        .replace_all(&t, |c: &regex::Captures| {
            format!("{}<stop>", "<prd>".repeat(c[0].len()))
        })
        .into_owned();
    if t.contains("Ph.D") {
        t = t.replace("Ph.D.", "Ph<prd>D<prd>");
    }
    t = sub(&t, &format!(r"\s{ALPHA}[.] "), " ${1}<prd> ");
    t = sub(&t, &format!("{ACRONYMS} {STARTERS}"), "${1}<stop> ${2}");
    t = sub(
        &t,
        &format!("{ALPHA}[.]{ALPHA}[.]{ALPHA}[.]"),
        "${1}<prd>${2}<prd>${3}<prd>",
    );
    t = sub(&t, &format!("{ALPHA}[.]{ALPHA}[.]"), "${1}<prd>${2}<prd>");
    t = sub(
        &t,
        &format!(" {SUFFIXES}[.] {STARTERS}"),
        " ${1}<stop> ${2}",
    );
    t = sub(&t, &format!(" {SUFFIXES}[.]"), " ${1}<prd>");
    t = sub(&t, &format!(" {ALPHA}[.]"), " ${1}<prd>");
    if t.contains('\u{201d}') {
        t = t.replace(".\u{201d}", "\u{201d}.");
    }
    if t.contains('"') {
        t = t.replace(".\"", "\".");
    }
    if t.contains('!') {
        t = t.replace("!\"", "\"!");
    }
    if t.contains('?') {
        t = t.replace("?\"", "\"?");
    }
    t = t
        .replace('.', ".<stop>")
        .replace('?', "?<stop>")
        .replace('!', "!<stop>")
        .replace("<prd>", ".");
    let mut s: Vec<String> = t.split("<stop>").map(|x| x.trim().to_string()).collect();
    if s.last().is_some_and(|x| x.is_empty()) {
        s.pop();
    }
    s
}

/// langdetect's profile probabilities for the n-grams of all-capital Latin text.
struct CapsProfile {
    langs: Vec<String>,
    probs: std::collections::HashMap<String, Vec<(usize, f64)>>,
}

fn caps_profile() -> &'static CapsProfile {
    static P: std::sync::OnceLock<CapsProfile> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut p = CapsProfile {
            langs: Vec::new(),
            probs: Default::default(),
        };
        for line in include_str!("../data/langdetect_caps.tsv").lines() {
            let Some((key, rest)) = line.split_once('\t') else {
                continue;
            };
            if key == "langs" {
                p.langs = rest.split(' ').map(String::from).collect();
            } else if !key.starts_with('#') {
                let entries = rest
                    .split(',')
                    .filter_map(|e| {
                        let (i, v) = e.split_once(':')?;
                        Some((i.parse().ok()?, v.parse().ok()?))
                    })
                    .collect();
                p.probs.insert(key.replace('_', " "), entries);
            }
        }
        p
    })
}

/// langdetect 1.0.9 on text without lowercase letters, using only Latin script: langdetect
/// drops all n-grams inside an all-capital word but its first letter (and the word's last
/// letters with the following space), so such text is decided by a few hundred n-grams whose
/// profile probabilities are embedded (`data/langdetect_caps.tsv`). The naive Bayes
/// posterior is computed exactly instead of langdetect's random sampling of n-grams (which
/// only adds noise around the same maximum). `None` when the text is outside this domain;
/// `Some(None)` when it has no n-gram features (langdetect raises).
pub fn detect_language_caps(text: &str) -> Option<Option<String>> {
    let in_domain = |c: char| {
        let u = c as u32;
        c.is_whitespace()
            || u < 0x80
            || (0x2000..=0x206F).contains(&u)
            || (0xC0..=0xDE).contains(&u)
            || [0xA0, 0xAB, 0xB0, 0xBB].contains(&u)
    };
    if !text.chars().all(in_domain) || text.chars().any(char::is_lowercase) {
        return None;
    }
    static URL: std::sync::OnceLock<(Regex, Regex)> = std::sync::OnceLock::new();
    let (url, mail) = URL.get_or_init(|| {
        (
            Regex::new(r"https?://[-_.?&~;+=/#0-9A-Za-z]+").expect("regex"),
            Regex::new(r"[-_.0-9A-Za-z]{1,64}@[-_0-9A-Za-z]+[-_.0-9A-Za-z]+").expect("regex"),
        )
    });
    let t = url.replace_all(text, " ");
    let t = mail.replace_all(&t, " ");
    // Detector.append: at most 10000 chars, runs of raw spaces collapsed.
    let mut chars: Vec<char> = Vec::new();
    let mut pre = '\0';
    for c in t.chars().take(10_000) {
        if c != ' ' || pre != ' ' {
            chars.push(c);
        }
        pre = c;
    }
    // Detector.cleaning_text: mostly non-Latin text loses its Latin letters.
    let latin = chars.iter().filter(|&&c| ('A'..='z').contains(&c)).count();
    let non_latin = chars
        .iter()
        .filter(|&&c| c as u32 >= 0x300 && !(0x1E00..=0x1EFF).contains(&(c as u32)))
        .count();
    if latin * 2 < non_latin {
        chars.retain(|c| !('A'..='z').contains(c));
    }
    // NGram.normalize for this domain: non-letters become spaces.
    let normalize = |c: char| {
        let u = c as u32;
        if (u < 0x80 && !c.is_ascii_alphabetic())
            || [0xA0, 0xAB, 0xB0, 0xBB].contains(&u)
            || (0x2000..=0x206F).contains(&u)
        {
            ' '
        } else {
            c
        }
    };
    let prof = caps_profile();
    let mut features: Vec<&Vec<(usize, f64)>> = Vec::new();
    let mut grams: Vec<char> = vec![' '];
    let mut capital_word = false;
    for c in chars {
        let ch = normalize(c);
        let last = *grams.last().expect("non-empty");
        if last == ' ' {
            grams = vec![' '];
            capital_word = false;
            if ch == ' ' {
                continue;
            }
        } else if grams.len() >= 3 {
            grams.remove(0);
        }
        grams.push(ch);
        if ch.is_uppercase() {
            if last.is_uppercase() {
                capital_word = true;
            }
        } else {
            capital_word = false;
        }
        if capital_word {
            continue;
        }
        for n in 1..=3 {
            if grams.len() < n {
                break;
            }
            let w: String = grams[grams.len() - n..].iter().collect();
            if w != " " {
                if let Some(p) = prof.probs.get(&w) {
                    features.push(p);
                }
            }
        }
    }
    if features.is_empty() {
        return Some(None);
    }
    // Detector: each n-gram multiplies P(lang) by alpha / BASE_FREQ + P(n-gram | lang).
    let weight = 0.5 / 10_000.0;
    let mut score = vec![0.0f64; prof.langs.len()];
    let mut p = vec![0.0f64; prof.langs.len()];
    for f in features {
        p.iter_mut().for_each(|x| *x = 0.0);
        for &(i, v) in f {
            p[i] = v;
        }
        for (s, &v) in score.iter_mut().zip(&p) {
            *s += (weight + v).ln();
        }
    }
    let best = (0..score.len()).fold(0, |b, i| if score[i] > score[b] { i } else { b });
    Some(Some(prof.langs[best].clone()))
}

/// Approximation of langdetect: the dominant script decides non-Latin languages (with
/// letter hints for Cyrillic, Arabic-script and Devanagari languages); Latin text is scored by
/// frequent function words ("und" when none is found). Returns langdetect-style codes ("en",
/// "ru", "zh-cn", …) or None when the text has no letters (langdetect raises, which IFEval
/// counts as followed). Text without lowercase letters goes to [`detect_language_caps`].
pub fn detect_language(text: &str) -> Option<String> {
    if let Some(caps) = detect_language_caps(text) {
        return caps;
    }
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        let u = c as u32;
        let script = match u {
            0x0400..=0x04FF => "cyrillic",
            0x0600..=0x06FF | 0x0750..=0x077F | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => "arabic",
            0x0900..=0x097F => "devanagari",
            0x0980..=0x09FF => "bn",
            0x0A00..=0x0A7F => "pa",
            0x0A80..=0x0AFF => "gu",
            0x0B80..=0x0BFF => "ta",
            0x0C00..=0x0C7F => "te",
            0x0C80..=0x0CFF => "kn",
            0x0D00..=0x0D7F => "ml",
            0x0E00..=0x0E7F => "th",
            0x0590..=0x05FF => "he",
            0x0370..=0x03FF => "el",
            0x3040..=0x30FF => "kana",
            0xAC00..=0xD7AF | 0x1100..=0x11FF => "ko",
            0x4E00..=0x9FFF | 0x3400..=0x4DBF => "han",
            _ if c.is_ascii_alphabetic()
                || (0x00C0..=0x024F).contains(&u)
                || (0x1E00..=0x1EFF).contains(&u) =>
            {
                "latin"
            }
            _ => "other",
        };
        *counts.entry(script).or_insert(0) += 1;
    }
    let (script, _) = counts
        .iter()
        .max_by_key(|(k, v)| (**v, std::cmp::Reverse(**k)))?;
    let has = |chars: &str| text.chars().any(|c| chars.contains(c));
    let lang = match *script {
        "cyrillic" => {
            if has("іїєґІЇЄҐ") {
                "uk"
            } else if has("ыэёЫЭЁ") {
                "ru"
            } else if has("ъЪ") {
                "bg"
            } else {
                "ru"
            }
        }
        "arabic" => {
            if has("\u{0679}\u{0688}\u{0691}\u{06BA}\u{06D2}\u{06BE}") {
                "ur"
            } else if has("\u{067E}\u{0686}\u{0698}\u{06AF}\u{06A9}\u{06CC}") {
                "fa"
            } else {
                "ar"
            }
        }
        "devanagari" => {
            let n = |w: &str| text.matches(w).count();
            if n("आहे") + n("ळ") > n("है") {
                "mr"
            } else if n("छ") > n("है") {
                "ne"
            } else {
                "hi"
            }
        }
        "kana" => "ja",
        "han" => {
            if counts.contains_key("kana") {
                "ja"
            } else {
                "zh-cn"
            }
        }
        "latin" => return Some(latin_language(text)),
        "other" => return None,
        s => s,
    };
    Some(lang.to_string())
}

fn latin_language(text: &str) -> String {
    if text
        .chars()
        .any(|c| "ơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđĐ".contains(c))
    {
        return "vi".into();
    }
    const WORDS: &[(&str, &str)] = &[
        (
            "en",
            "the and of to in is that it for you with was on are this be as have not but they i we my your he she said then at by from or an what so if about all there their which would can will",
        ),
        (
            "es",
            "el la de que y en los se del las por un una para con no es al lo como más",
        ),
        (
            "pt",
            "o a de que e do da em um para com não uma os no se na por mais as dos é pela pelo foi muito mas",
        ),
        (
            "fr",
            "le la de et les des est un une du en que pas pour qui dans sur au il elle",
        ),
        (
            "de",
            "der die und das ist nicht ein eine zu den von mit sich des auf für im dem auch ich wir guten",
        ),
        (
            "it",
            "il di che e la per un una non sono del della le gli con si è ma anche questo",
        ),
        (
            "pl",
            "i w nie na się z do to że jest jak ale co o od po tak dla czy",
        ),
        (
            "sw",
            "na ya wa kwa ni za la katika kuwa hii cha vya yake huo watu sana",
        ),
        (
            "fi",
            "ja on ei se että oli hän mutta kun niin myös tai ovat tämä mitä joka paljon kiitos",
        ),
        (
            "nl",
            "de het een en van is dat niet op te zijn voor met die ook",
        ),
        (
            "tr",
            "ve bir bu da için ile çok ama gibi daha olarak değil ne var",
        ),
        (
            "id",
            "yang dan di dengan untuk tidak ini dari dalam akan pada juga ada itu",
        ),
    ];
    let lower = text.to_lowercase();
    let tokens: Vec<&str> = lower
        .split(|c: char| !c.is_alphabetic())
        .filter(|t| !t.is_empty())
        .collect();
    // No known function word: a long text is most likely English (langdetect says "en" for
    // e.g. long lists of English nouns), but on a few words langdetect's answer is
    // unpredictable and rarely "en" ("hi", "ok", "guten morgen"), so claim no language.
    let mut best = (if tokens.len() < 4 { "und" } else { "en" }, 0usize);
    for (lang, list) in WORDS {
        let set: std::collections::HashSet<&str> = list.split(' ').collect();
        let score = tokens.iter().filter(|t| set.contains(*t)).count();
        if score > best.1 {
            best = (lang, score);
        }
    }
    best.0.to_string()
}

/// Does `response` follow instruction `id` with arguments `kw`? `prompt` is the user prompt.
/// Err for an unknown instruction or malformed arguments.
pub fn check(id: &str, kw: &Value, response: &str) -> Result<bool, String> {
    let v = response;
    Ok(match id {
        "keywords:existence" => {
            let mut ks = kw_list(kw, "keywords")?;
            ks.sort();
            ks.iter().all(|k| rx(&format!("(?i){k}")).is_match(v))
        }
        "keywords:frequency" => {
            let k = kw_str(kw, "keyword")?.trim().to_string();
            let n = rx(&format!("(?i){k}")).find_iter(v).count() as i64;
            relation(&kw_str(kw, "relation")?, n, kw_int(kw, "frequency")?)?
        }
        "keywords:forbidden_words" => {
            let ws = kw_list(kw, "forbidden_words")?;
            !ws.iter().any(|w| rx(&format!(r"(?i)\b{w}\b")).is_match(v))
        }
        "keywords:letter_frequency" => {
            let letter = kw_str(kw, "letter")?.trim().to_lowercase();
            let lc = v.to_lowercase();
            let n = match letter.chars().next() {
                Some(l) if letter.chars().count() == 1 => {
                    lc.chars().filter(|&c| c == l).count() as i64
                }
                _ => return Err("'letter' must be one character".into()),
            };
            relation(
                &kw_str(kw, "let_relation")?,
                n,
                kw_int(kw, "let_frequency")?,
            )?
        }
        "language:response_language" => match detect_language(v) {
            Some(l) => l == kw_str(kw, "language")?,
            None => true,
        },
        "length_constraints:number_sentences" => {
            let n = crate::punkt::count_sentences(v) as i64;
            relation(&kw_str(kw, "relation")?, n, kw_int(kw, "num_sentences")?)?
        }
        "length_constraints:number_paragraphs" => {
            let parts: Vec<&str> = rx(r"\s?\*\*\*\s?").split(v).collect();
            let mut n = parts.len() as i64;
            for (i, p) in parts.iter().enumerate() {
                if p.trim().is_empty() {
                    if i == 0 || i == parts.len() - 1 {
                        n -= 1;
                    } else {
                        return Ok(false);
                    }
                }
            }
            n == kw_int(kw, "num_paragraphs")?
        }
        "length_constraints:number_words" => relation(
            &kw_str(kw, "relation")?,
            count_words(v) as i64,
            kw_int(kw, "num_words")?,
        )?,
        "length_constraints:nth_paragraph_first_word" => {
            let want_n = kw_int(kw, "num_paragraphs")?;
            let nth = kw_int(kw, "nth_paragraph")?;
            let first = kw_str(kw, "first_word")?.to_lowercase();
            let parts: Vec<&str> = v.split("\n\n").collect();
            let n = parts.iter().filter(|p| !p.trim().is_empty()).count() as i64;
            if nth < 1 || nth > n {
                return Ok(false);
            }
            let p = parts[(nth - 1) as usize].trim();
            if p.is_empty() {
                return Ok(false);
            }
            let word = p
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim()
                .trim_start_matches('\'')
                .trim_start_matches('"');
            let mut fw = String::new();
            for c in word.chars() {
                if ".,?!'\"".contains(c) {
                    break;
                }
                fw.extend(c.to_lowercase());
            }
            n == want_n && fw == first
        }
        "detectable_content:number_placeholders" => {
            rx(r"\[.*?\]").find_iter(v).count() as i64 >= kw_int(kw, "num_placeholders")?
        }
        "detectable_content:postscript" => {
            let marker = kw_str(kw, "postscript_marker")?.trim().to_string();
            let pat = match marker.as_str() {
                "P.P.S" => r"(?m)\s*p\.\s?p\.\s?s.*$".to_string(),
                "P.S." => r"(?m)\s*p\.\s?s\..*$".to_string(),
                m => format!(r"(?m)\s*{}.*$", m.to_lowercase()),
            };
            rx(&pat).is_match(&v.to_lowercase())
        }
        "detectable_format:number_bullet_lists" => {
            let a = rx(r"(?m)^\s*\*[^\*].*$").find_iter(v).count();
            let b = rx(r"(?m)^\s*-.*$").find_iter(v).count();
            (a + b) as i64 == kw_int(kw, "num_bullets")?
        }
        "detectable_format:constrained_response" => {
            let t = v.trim();
            [
                "My answer is yes.",
                "My answer is no.",
                "My answer is maybe.",
            ]
            .iter()
            .any(|o| t.contains(o))
        }
        "detectable_format:number_highlighted_sections" => {
            let single = rx(r"\*[^\n\*]*\*")
                .find_iter(v)
                .filter(|m| !m.as_str().trim_matches('*').trim().is_empty())
                .count();
            let double = rx(r"\*\*[^\n\*]*\*\*")
                .find_iter(v)
                .filter(|m| {
                    let s = m.as_str();
                    let s = s.strip_prefix("**").unwrap_or(s);
                    !s.strip_suffix("**").unwrap_or(s).trim().is_empty()
                })
                .count();
            (single + double) as i64 >= kw_int(kw, "num_highlights")?
        }
        "detectable_format:multiple_sections" => {
            let sp = kw_str(kw, "section_spliter")?.trim().to_string();
            rx(&format!(r"\s?{sp}\s?\d+\s?")).find_iter(v).count() as i64
                >= kw_int(kw, "num_sections")?
        }
        "detectable_format:json_format" => {
            let mut t = v.trim();
            for p in ["```json", "```Json", "```JSON", "```"] {
                t = t.strip_prefix(p).unwrap_or(t);
            }
            t = t.strip_suffix("```").unwrap_or(t).trim();
            serde_json::from_str::<Value>(t).is_ok()
                || serde_json::from_str::<Value>(&python_json_to_strict(t)).is_ok()
        }
        "detectable_format:title" => rx(r"<<[^\n]+>>").find_iter(v).any(|m| {
            !m.as_str()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .trim()
                .is_empty()
        }),
        "combination:two_responses" => {
            let parts: Vec<&str> = v.split("******").collect();
            let mut valid = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                if p.trim().is_empty() {
                    if i != 0 && i != parts.len() - 1 {
                        return Ok(false);
                    }
                } else {
                    valid.push(*p);
                }
            }
            valid.len() == 2 && valid[0].trim() != valid[1].trim()
        }
        "combination:repeat_prompt" => {
            let p = kw_str(kw, "prompt_to_repeat")?;
            v.trim()
                .to_lowercase()
                .starts_with(&p.trim().to_lowercase())
        }
        "startend:end_checker" => {
            let e = kw_str(kw, "end_phrase")?.trim().to_lowercase();
            v.trim().trim_matches('"').to_lowercase().ends_with(&e)
        }
        "change_case:capital_word_frequency" => {
            let n = crate::punkt::word_tokenize(v)
                .iter()
                .filter(|w| is_upper(w))
                .count() as i64;
            let rel = kw_str(kw, "capital_relation")?;
            let f = kw_int(kw, "capital_frequency")?;
            if rel == "less than" {
                n < f
            } else {
                n >= f
            }
        }
        "change_case:english_capital" => {
            is_upper(v) && detect_language(v).is_none_or(|l| l == "en")
        }
        "change_case:english_lowercase" => {
            is_lower(v) && detect_language(v).is_none_or(|l| l == "en")
        }
        "punctuation:no_comma" => !v.contains(','),
        "startend:quotation" => {
            let t = v.trim();
            t.chars().count() > 1 && t.starts_with('"') && t.ends_with('"')
        }
        other => return Err(format!("unknown instruction '{other}'")),
    })
}

/// Python's `json.loads` also accepts `NaN`, `Infinity`, `-Infinity` and numbers beyond f64
/// (`1e400` is inf); serde_json rejects them. Outside strings, replace those literals (and
/// every valid JSON number) by `0`, so that serde_json accepts exactly what Python accepts.
fn python_json_to_strict(t: &str) -> String {
    static NUM: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let num = NUM.get_or_init(|| {
        Regex::new(r"^(-?Infinity|NaN|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?)")
            .expect("regex")
    });
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if c == '"' {
            // Copy the string literal through its closing quote, honouring escapes.
            let mut end = rest.len();
            let mut escaped = false;
            for (i, ch) in rest.char_indices().skip(1) {
                if escaped {
                    escaped = false;
                } else if ch == '\\' {
                    escaped = true;
                } else if ch == '"' {
                    end = i + 1;
                    break;
                }
            }
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        } else if let Some(m) = num.find(rest) {
            out.push('0');
            rest = &rest[m.end()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The loose variants of a response: as is, without the first line, without the last, without
/// both, and each of those with `*` removed.
pub fn loose_variants(response: &str) -> Vec<String> {
    let r: Vec<&str> = response.split('\n').collect();
    let join = |s: &[&str]| s.join("\n").trim().to_string();
    let first = join(if r.len() > 1 { &r[1..] } else { &[] });
    let last = join(&r[..r.len().saturating_sub(1)]);
    let both = join(if r.len() > 2 { &r[1..r.len() - 1] } else { &[] });
    vec![
        response.to_string(),
        response.replace('*', ""),
        first.clone(),
        last.clone(),
        both.clone(),
        first.replace('*', ""),
        last.replace('*', ""),
        both.replace('*', ""),
    ]
}

/// (strict, loose) verdicts for each instruction of a prompt.
pub fn evaluate(
    ids: &[String],
    kwargs: &[Value],
    response: &str,
) -> Result<(Vec<bool>, Vec<bool>), String> {
    let variants = loose_variants(response);
    let mut strict = Vec::new();
    let mut loose = Vec::new();
    for (id, kw) in ids.iter().zip(kwargs) {
        strict.push(!response.trim().is_empty() && check(id, kw, response)?);
        let mut ok = false;
        for r in &variants {
            if !r.trim().is_empty() && check(id, kw, r)? {
                ok = true;
                break;
            }
        }
        loose.push(ok);
    }
    Ok((strict, loose))
}

#[cfg(test)]
#[path = "ifeval_tests.rs"]
mod tests;
