//! Text that comes from other parties (experiment names, purposes, column names, custodians'
//! reasons) made safe to print and log: control characters and the invisible formatting
//! characters that can reorder or hide text on a terminal ("Trojan Source" bidi overrides,
//! zero-width characters) are shown escaped, so a custodian reads exactly what was sent.

use std::borrow::Cow;

/// Whether `c` would not show as itself on a terminal or in a log line.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM/RLM
            | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // bidi isolates
            | '\u{FEFF}'              // zero-width no-break space
            | '\u{FFF9}'..='\u{FFFB}' // interlinear annotation
        )
}

/// `text` with every unprintable character written as a Rust-style escape (`\u{202e}`, `\n`).
/// Borrowed when nothing needs escaping.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unprintable) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unprintable(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_invisible_characters_only() {
        for (input, want) in [
            ("plain name", "plain name"),
            ("Größe é 中文", "Größe é 中文"),
            ("two\nlines", "two\\nlines"),
            ("bell\u{7}", "bell\\u{7}"),
            ("esc\u{1b}[31mred", "esc\\u{1b}[31mred"),
            ("rev\u{202E}txt", "rev\\u{202e}txt"),
            ("zero\u{200B}width", "zero\\u{200b}width"),
        ] {
            assert_eq!(printable(input), want, "{input:?}");
        }
        assert!(matches!(printable("ok"), Cow::Borrowed(_)));
    }
}
