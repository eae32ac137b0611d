//! Printing: human text, or exactly one JSON value on stdout with `--output json`.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl Output {
    /// Prints `json` in JSON mode, `text` otherwise.
    pub fn print(self, json: &serde_json::Value, text: impl FnOnce() -> String) {
        match self {
            Output::Json => println!("{json}"),
            Output::Text => {
                let t = text();
                if t.ends_with('\n') {
                    print!("{t}");
                } else {
                    println!("{t}");
                }
            }
        }
    }
}

impl Output {
    /// Prints a list: a JSON array, or "Found N <noun>" and each item's text.
    pub fn print_list<T>(
        self,
        noun: &str,
        items: &[T],
        json: impl Fn(&T) -> serde_json::Value,
        text: impl Fn(&T) -> String,
    ) {
        let values = serde_json::Value::Array(items.iter().map(&json).collect());
        self.print(&values, || {
            let mut s = format!("Found {} {noun}\n", items.len());
            for item in items {
                s += "\n";
                s += &text(item);
            }
            s
        });
    }
}

/// RFC 3339 for a Unix timestamp (UTC).
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}
