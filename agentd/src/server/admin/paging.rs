//! Paging for the admin listings that grow with the deployment (nodes, grants): items in a
//! fixed key order, a page of at most `page_size` items and about 2 MiB, and a page token
//! that is the last key sent (so a page never repeats or skips an item that stays put).

use super::status::{invalid, AdminError};

/// A page stops before this many encoded bytes (clients take 4 MiB by default).
const PAGE_BYTES: usize = 2 << 20;

/// A request's `page_size`: 0 for `default`, at most `max`.
pub(super) fn page_size_or(
    page_size: u32,
    default: usize,
    max: usize,
) -> Result<usize, AdminError> {
    match page_size as usize {
        0 => Ok(default),
        n if n > max => Err(invalid("page_size", format!("{n}; at most {max}"))),
        n => Ok(n),
    }
}

/// A page token that is a sequence number (audit records, revocations): the last one sent;
/// empty for the first page.
pub(super) fn sequence_token(page_token: &str) -> Result<u64, AdminError> {
    match page_token {
        "" => Ok(0),
        t => t
            .parse()
            .map_err(|_| invalid("page_token", "not a token this server gave out")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PageRequest {
    size: usize,
    after: Option<String>,
}

impl PageRequest {
    /// From the request's `page_size` (0: `default`; at most `max`) and `page_token`.
    pub(super) fn parse(
        page_size: u32,
        page_token: &str,
        default: usize,
        max: usize,
    ) -> Result<Self, AdminError> {
        let size = page_size_or(page_size, default, max)?;
        if page_token.len() > 4096 {
            return Err(invalid("page_token", "longer than 4096 bytes"));
        }
        Ok(Self {
            size,
            after: (!page_token.is_empty()).then(|| page_token.to_string()),
        })
    }

    /// The page of `items` (sorted here by key) after the token, and the next token (empty
    /// after the last page).
    pub(super) fn cut<T: prost::Message>(&self, items: Vec<(String, T)>) -> (Vec<T>, String) {
        self.cut_by(items, prost::Message::encoded_len)
    }

    /// [`cut`](Self::cut) for items that are not one message (rows of two kinds), sized by
    /// `encoded_len`.
    pub(super) fn cut_by<T>(
        &self,
        mut items: Vec<(String, T)>,
        encoded_len: impl Fn(&T) -> usize,
    ) -> (Vec<T>, String) {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let start = match &self.after {
            Some(after) => items.partition_point(|(k, _)| k <= after),
            None => 0,
        };
        let mut page = Vec::new();
        let mut last = None;
        let mut bytes = 0;
        for (key, item) in items.into_iter().skip(start) {
            let len = encoded_len(&item) + 8;
            if page.len() >= self.size || (!page.is_empty() && bytes + len > PAGE_BYTES) {
                return (page, last.unwrap_or_default());
            }
            bytes += len;
            page.push(item);
            last = Some(key);
        }
        (page, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<(String, agentd_proto::admin::Node)> {
        (0..n)
            .rev()
            .map(|i| {
                let id = format!("spiffe://example.org/node/{i:05}");
                (
                    id.clone(),
                    agentd_proto::admin::Node {
                        spiffe_id: id,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn pages_hold_every_item_once_in_key_order() {
        let req = |token: &str| PageRequest::parse(300, token, 1000, 5000).unwrap();
        let mut token = String::new();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let (page, next) = req(&token).cut(items(1_000));
            assert!(page.len() <= 300);
            pages += 1;
            seen.extend(page.into_iter().map(|n| n.spiffe_id));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, 4);
        let want: Vec<String> = (0..1_000)
            .map(|i| format!("spiffe://example.org/node/{i:05}"))
            .collect();
        assert_eq!(seen, want);
        // An exact multiple ends without an empty page after it.
        let (page, next) = PageRequest::parse(0, "", 1000, 5000)
            .unwrap()
            .cut(items(1_000));
        assert_eq!((page.len(), next.as_str()), (1_000, ""));
    }

    #[test]
    fn a_page_stops_under_the_byte_budget_and_bad_sizes_are_named() {
        let big: Vec<(String, agentd_proto::admin::Node)> = (0..10)
            .map(|i| {
                (
                    format!("{i}"),
                    agentd_proto::admin::Node {
                        selectors: vec!["s".repeat(500_000)],
                        ..Default::default()
                    },
                )
            })
            .collect();
        let (page, next) = PageRequest::parse(0, "", 1000, 5000).unwrap().cut(big);
        assert_eq!(page.len(), 4);
        assert_eq!(next, "3");
        let err = PageRequest::parse(5001, "", 1000, 5000).unwrap_err();
        assert!(err.to_string().contains("page_size"), "{err}");
    }
}
