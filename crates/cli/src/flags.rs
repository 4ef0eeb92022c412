//! Library errors name options by their field names in backticks (`lora_r`), since a library
//! does not know how a front end spells them; the CLI user knows them as flags (`--lora-r`).
//! This is the one place that translates, for the errors that say they concern an option.

/// The flag of a library option.
pub fn flag(option: &str) -> String {
    match option {
        // Library names that differ from the flag's.
        "patterns" => "--matrices".into(),
        _ => format!("--{}", option.replace('_', "-")),
    }
}

/// The option a library error concerns, if it says it concerns one.
fn option_of(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if let Some(e) = e.downcast_ref::<methods::Error>() {
        return e.invalid_option();
    }
    if let Some(e) = e.downcast_ref::<eval::Error>() {
        return e.invalid_option();
    }
    if let Some(e) = e.downcast_ref::<models::Error>() {
        return e.invalid_option();
    }
    if let Some(e) = e.downcast_ref::<data::Error>() {
        return e.invalid_option();
    }
    None
}

/// `text` with every `option_name` in backticks written as its flag.
pub fn with_flags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('`') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let name = after.find('`').map(|j| &after[..j]).filter(|n| {
            n.starts_with(|c: char| c.is_ascii_lowercase())
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        match name {
            Some(n) => {
                out.push_str(&flag(n));
                rest = &after[n.len() + 1..];
            }
            None => {
                out.push('`');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of one error of a chain, with the options it names written as flags when it
/// concerns an option.
pub fn cause_text(e: &(dyn std::error::Error + 'static)) -> String {
    let s = e.to_string();
    match option_of(e) {
        Some(_) => with_flags(&s),
        None => s,
    }
}

/// Whether any error of the chain concerns an option.
pub fn names_options(e: &anyhow::Error) -> bool {
    e.chain().any(|c| option_of(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backticked_options_become_flags_and_nothing_else_changes() {
        assert_eq!(
            with_flags("`lora_r` 9 is out of range; lower `max_len` or set `patterns`"),
            "--lora-r 9 is out of range; lower --max-len or set --matrices"
        );
        // Not option names: left as they are, as is an unpaired backtick.
        assert_eq!(
            with_flags("run `pip download` in `x`"),
            "run `pip download` in --x"
        );
        assert_eq!(with_flags("a ` b `C` d`"), "a ` b `C` d`");
        assert_eq!(with_flags("no options"), "no options");
    }

    #[test]
    fn only_errors_about_an_option_are_rewritten() {
        let typed = methods::Error::Model(models::Error::option("chat", "run without `chat`"));
        assert_eq!(cause_text(&typed), "run without --chat");
        let plain = methods::Error::Msg("run without `chat`".into());
        assert_eq!(cause_text(&plain), "run without `chat`");
        let data = eval::Error::Data(data::Error::MissingData {
            path: "d".into(),
            hint: "pass another `data_dir`".into(),
        });
        assert_eq!(cause_text(&data), "d: not found (pass another --data-dir)");
        let e = anyhow::Error::from(methods::Error::option("lr", "`lr` must be > 0"))
            .context("fine-tuning");
        assert!(names_options(&e));
    }
}
