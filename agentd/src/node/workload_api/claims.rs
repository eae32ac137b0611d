//! JSON claims to `google.protobuf.Struct`, as ValidateJWTSVID returns them.

use prost_types::{value::Kind, ListValue, Struct, Value};

pub fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_claims_convert() {
        let json = serde_json::json!({"sub": "spiffe://example.org/a", "aud": ["x", "y"], "exp": 5, "n": null, "o": {"k": true}});
        let s = to_struct(json.as_object().unwrap().clone());
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/a".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        match &s.fields["aud"].kind {
            Some(Kind::ListValue(l)) => assert_eq!(l.values.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.fields["o"].kind, Some(Kind::StructValue(_))));
    }
}
