//! `entry create --data FILE` and `entry delete --data FILE`: bulk registration in SPIRE's
//! JSON shape, so an existing `spire-server entry create -data` file loads unchanged.
//!
//! Accepted documents:
//! - SPIRE's `{"entries": [ ... ]}`;
//! - a bare array of entries, which is what `agentd entry show --output json` prints;
//! - one entry object, what `agentd entry show --id ID --output json` prints.
//!
//! An entry takes SPIRE's fields (`spiffe_id`, `parent_id`, `selectors`, `x509_svid_ttl`,
//! `jwt_svid_ttl`, the older `ttl`, `dns_names`, `hint`, `federates_with`), ours (`scopes`,
//! `owner`), and ignores
//! what our own output adds (`id`, `revision`, `created_at`, ...). A SPIFFE ID is a string or
//! SPIRE's `{"trust_domain": ..., "path": ...}`; a selector is `{"type": ..., "value": ...}` or
//! a `"type:value"` string. SPIRE features agentd does not have (`admin`, `downstream`,
//! `store_svid`, `entry_expiry`) are refused when set rather than silently
//! dropped; an unknown field is refused too (a typo must not lose a selector).
//!
//! Parsing is per entry: a bad entry is reported with its path (`entries[3].selectors[0]`)
//! and not sent; the others are.

use agentd_proto::admin as pb;
use serde_json::{Map, Value};

/// What our own `entry show --output json` prints besides the spec: ignored on input.
const OUTPUT_ONLY: &[&str] = &[
    "id",
    "entry_id",
    "revision",
    "revision_number",
    "created_at",
    "revoked_by",
    "last_issued",
    "last_fetched",
    "owner_disabled",
    "suspended",
];

/// SPIRE fields agentd has no feature for: accepted only at their "off" value.
const UNSUPPORTED: &[&str] = &["admin", "downstream", "store_svid", "entry_expiry"];

/// One entry of a data document: the path its errors name (`entries[3]`), and its fields.
pub type DataEntry = (String, Map<String, Value>);

/// The entries of a data document.
pub fn entries(text: &str) -> Result<Vec<DataEntry>, String> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| format!("the data is not JSON: {e}"))?;
    let (prefix, items) = match doc {
        Value::Object(mut o) if o.contains_key("entries") => {
            match o.remove("entries").unwrap_or(Value::Null) {
                Value::Array(a) => ("entries", a),
                _ => return Err("entries: not an array".into()),
            }
        }
        Value::Object(o) => return Ok(vec![("entry".into(), o)]),
        Value::Array(a) => ("", a),
        _ => {
            return Err(
                "the data is neither an entry, an array of entries nor {\"entries\": [...]}".into(),
            )
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let path = format!("{prefix}[{i}]");
            match v {
                Value::Object(o) => Ok((path, o)),
                _ => Err(format!("{path}: not an object")),
            }
        })
        .collect()
}

fn spiffe_id(path: &str, field: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(o) => {
            let td = o.get("trust_domain").and_then(Value::as_str);
            let p = o.get("path").and_then(Value::as_str);
            match (td, p) {
                (Some(td), Some(p)) => Ok(format!("spiffe://{td}{p}")),
                _ => Err(format!(
                    "{path}.{field}: an object needs the strings trust_domain and path"
                )),
            }
        }
        _ => Err(format!(
            "{path}.{field}: not a SPIFFE ID string or {{trust_domain, path}}"
        )),
    }
}

fn strings(path: &str, field: &str, v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(a) = v else {
        return Err(format!("{path}.{field}: not an array of strings"));
    };
    a.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{path}.{field}[{i}]: not a string"))
        })
        .collect()
}

fn selectors(path: &str, v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(a) = v else {
        return Err(format!("{path}.selectors: not an array"));
    };
    a.iter()
        .enumerate()
        .map(|(i, s)| match s {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => match (
                o.get("type").and_then(Value::as_str),
                o.get("value").and_then(Value::as_str),
            ) {
                (Some(t), Some(v)) => Ok(format!("{t}:{v}")),
                _ => Err(format!(
                    "{path}.selectors[{i}]: an object needs the strings type and value"
                )),
            },
            _ => Err(format!(
                "{path}.selectors[{i}]: not a \"type:value\" string or {{type, value}}"
            )),
        })
        .collect()
}

fn seconds(path: &str, field: &str, v: &Value) -> Result<i64, String> {
    match v.as_i64() {
        Some(n) if n >= 0 => Ok(n),
        _ => Err(format!(
            "{path}.{field}: not a whole number of seconds (0: the server's default)"
        )),
    }
}

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// One entry's spec, or why not, naming the field by its path.
pub fn spec(path: &str, o: &Map<String, Value>) -> Result<pb::EntrySpec, String> {
    let mut spec = pb::EntrySpec::default();
    let mut errors = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    for (k, v) in o {
        let k = k.as_str();
        note((|| {
            match k {
                "spiffe_id" => spec.spiffe_id = spiffe_id(path, k, v)?,
                "parent_id" => spec.parent_id = spiffe_id(path, k, v)?,
                "selectors" => spec.selectors = selectors(path, v)?,
                "x509_svid_ttl" | "ttl" => spec.x509_svid_ttl_seconds = seconds(path, k, v)?,
                "jwt_svid_ttl" => spec.jwt_svid_ttl_seconds = seconds(path, k, v)?,
                "dns_names" => spec.dns_names = strings(path, k, v)?,
                "scopes" => spec.scopes = strings(path, k, v)?,
                "federates_with" => spec.federates_with = strings(path, k, v)?,
                "resources" => spec.resources = strings(path, k, v)?,
                "hint" | "owner" => {
                    let s = match v {
                        Value::Null => String::new(),
                        Value::String(s) => s.clone(),
                        _ => return Err(format!("{path}.{k}: not a string")),
                    };
                    if k == "hint" {
                        spec.hint = s;
                    } else {
                        spec.owner = s;
                    }
                }
                _ if OUTPUT_ONLY.contains(&k) => {}
                _ if UNSUPPORTED.contains(&k) => {
                    if !is_off(v) {
                        return Err(format!("{path}.{k}: not supported by agentd"));
                    }
                }
                _ => return Err(format!("{path}.{k}: unknown field")),
            }
            Ok(())
        })());
    }
    for (field, missing) in [
        ("spiffe_id", spec.spiffe_id.is_empty()),
        ("parent_id", spec.parent_id.is_empty()),
        ("selectors", spec.selectors.is_empty()),
    ] {
        if missing && !o.contains_key(field) {
            errors.push(format!("{path}.{field}: missing"));
        }
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors.join("; "))
    }
}

/// An entry's id for `entry delete --data`: its `id` (or SPIRE's `entry_id`).
pub fn entry_id(path: &str, o: &Map<String, Value>) -> Result<String, String> {
    match o.get("id").or_else(|| o.get("entry_id")) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(format!("{path}.id: not an entry id string")),
        None => Err(format!(
            "{path}.id: missing (the entry's id, as entry show prints it)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<pb::EntrySpec, String> {
        let all = entries(text)?;
        assert_eq!(all.len(), 1);
        spec(&all[0].0, &all[0].1)
    }

    #[test]
    fn spires_shape_loads() {
        let s = one(
            r#"{"entries":[{"selectors":[{"type":"unix","value":"uid:501"}],
            "spiffe_id":"spiffe://example.org/myservice","parent_id":"spiffe://example.org/host",
            "x509_svid_ttl":3600,"jwt_svid_ttl":300,"dns_names":["a.example.org"],
            "hint":"h","admin":false,"downstream":false,
            "federates_with":["example-federated.org"]}]}"#,
        )
        .unwrap();
        assert_eq!(s.federates_with, ["example-federated.org"]);
        assert_eq!(s.spiffe_id, "spiffe://example.org/myservice");
        assert_eq!(s.parent_id, "spiffe://example.org/host");
        assert_eq!(s.selectors, ["unix:uid:501"]);
        assert_eq!(
            (s.x509_svid_ttl_seconds, s.jwt_svid_ttl_seconds),
            (3600, 300)
        );
        assert_eq!(s.dns_names, ["a.example.org"]);
        assert_eq!(s.hint, "h");
    }

    #[test]
    fn spire_id_objects_string_selectors_and_our_fields_load() {
        let s = one(r#"[{"spiffe_id":{"trust_domain":"example.org","path":"/a"},
            "parent_id":{"trust_domain":"example.org","path":"/n"},
            "selectors":["unix:uid:1000","unix:gid:5"],"ttl":60,
            "scopes":["crm:read"],"owner":"alice@example.com",
            "id":"e1","revision":3,"created_at":1,"revoked_by":null,"suspended":false}]"#)
        .unwrap();
        assert_eq!(s.spiffe_id, "spiffe://example.org/a");
        assert_eq!(s.selectors, ["unix:uid:1000", "unix:gid:5"]);
        assert_eq!(s.x509_svid_ttl_seconds, 60);
        assert_eq!(s.scopes, ["crm:read"]);
        assert_eq!(s.owner, "alice@example.com");
    }

    #[test]
    fn each_defect_is_named_by_its_path() {
        for (doc, needle) in [
            (
                r#"{"entries":[{"parent_id":"spiffe://e/n","selectors":["unix:uid:1"]}]}"#,
                "entries[0].spiffe_id: missing",
            ),
            (
                r#"[{"spiffe_id":"spiffe://e/a","parent_id":"spiffe://e/n","selectors":[{"type":"unix"}]}]"#,
                "[0].selectors[0]: an object needs",
            ),
            (
                r#"[{"spiffe_id":"spiffe://e/a","parent_id":"spiffe://e/n","selectors":["unix:uid:1"],"x509_svid_ttl":-5}]"#,
                "[0].x509_svid_ttl: not a whole number",
            ),
            (
                r#"[{"spiffe_id":"spiffe://e/a","parent_id":"spiffe://e/n","selectors":["unix:uid:1"],"downstream":true}]"#,
                "[0].downstream: not supported",
            ),
            (
                r#"[{"spiffe_id":"spiffe://e/a","parent_id":"spiffe://e/n","selector":["unix:uid:1"]}]"#,
                "[0].selector: unknown field",
            ),
            (
                r#"[{"spiffe_id":7,"parent_id":"spiffe://e/n","selectors":["unix:uid:1"]}]"#,
                "[0].spiffe_id: not a SPIFFE ID",
            ),
        ] {
            let err = one(doc).unwrap_err();
            assert!(err.contains(needle), "{doc}: {err}");
        }
        assert!(entries("nope").unwrap_err().contains("not JSON"));
        assert!(entries(r#"{"entries":5}"#)
            .unwrap_err()
            .contains("entries: not an array"));
        assert!(entries("[1]").unwrap_err().contains("[0]: not an object"));
    }

    #[test]
    fn delete_takes_the_ids_entry_show_prints() {
        let all = entries(r#"[{"id":"e1","spiffe_id":"x"},{"entry_id":"e2"},{"spiffe_id":"y"}]"#)
            .unwrap();
        let ids: Vec<_> = all.iter().map(|(p, o)| entry_id(p, o)).collect();
        assert_eq!(ids[0].as_deref(), Ok("e1"));
        assert_eq!(ids[1].as_deref(), Ok("e2"));
        assert!(ids[2].as_ref().unwrap_err().contains("[2].id: missing"));
    }
}
