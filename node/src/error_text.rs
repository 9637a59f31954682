//! One line from an error and its sources.

use std::error::Error;

/// clap's error as one line: its message with the arguments it names and its
/// tip (`a similar argument exists: …`), without the usage block after them
/// (`None` if it renders nothing).
pub fn clap_one_line(e: &clap::Error) -> Option<String> {
    let rendered = e.render().to_string();
    let line = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!line.is_empty()).then_some(line)
}

/// `e` and its sources joined by ": ", skipping empty messages and ones the
/// line already holds. Many errors print their source in their own message
/// and also expose it as their source (anyhow's `{:#}` then repeats it), and
/// libp2p's `TransportError::Other` prints nothing itself and keeps the
/// reason (an OS error, say) only as its source.
pub fn error_text(e: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let part = err.to_string();
        if !part.is_empty() && !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        next = err.source();
    }
    if text.is_empty() {
        text.push_str("no reason given");
    }
    text
}
