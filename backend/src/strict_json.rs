//! JSON parsed into a [`serde_json::Value`], except that an object naming a key twice is an
//! error (serde_json keeps the last one silently, so `{"cmd":"status","cmd":"hello"}` would run
//! `hello`). The control socket parses every request with it.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why [`from_slice`] refused the text.
#[derive(Debug)]
pub enum StrictError {
    /// Not JSON at all.
    Syntax(serde_json::Error),
    /// JSON, but an object names a key twice: the message says which.
    DuplicateKey(String),
}

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrictError::Syntax(e) => write!(f, "{e}"),
            StrictError::DuplicateKey(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StrictError {}

/// Parses `text` as one JSON value, refusing duplicate keys at any depth.
pub fn from_slice(text: &[u8]) -> Result<Value, StrictError> {
    match serde_json::from_slice::<Strict>(text) {
        Ok(Strict(v)) => Ok(v),
        // The visitor's own error is the only data error a Value can meet.
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            Err(StrictError::DuplicateKey(e.to_string()))
        }
        Err(e) => Err(StrictError::Syntax(e)),
    }
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the key {} appears twice in one object",
                    dovetail_store::names::shown(&key)
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_what_serde_json_parses() {
        for text in [
            r#"{"cmd":"status","id":7,"v":1}"#,
            r#"{"a":[1,-2,3.5,true,false,null,"x",{"b":{}}],"c":"\u00e9"}"#,
            "[]",
            "18446744073709551615",
            "-9223372036854775808",
            r#""s""#,
        ] {
            let ours = from_slice(text.as_bytes()).expect(text);
            let theirs: Value = serde_json::from_str(text).expect(text);
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn a_key_twice_is_an_error_at_any_depth() {
        for (text, key) in [
            (r#"{"cmd":"status","cmd":"hello"}"#, "cmd"),
            (r#"{"cmd":"tee","args":{"disk":"a","disk":"b"}}"#, "disk"),
            (r#"[{"x":1},{"y":[{"z":1,"z":1}]}]"#, "z"),
        ] {
            match from_slice(text.as_bytes()) {
                Err(StrictError::DuplicateKey(m)) => {
                    assert!(
                        m.contains(&format!("the key \"{key}\" appears twice")),
                        "{text}: {m}"
                    );
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // A long key is quoted by its prefix only.
        let long = "k".repeat(5000);
        let text = json!({ "a": 1 }).to_string().replace('a', &long);
        let text = format!("{},{}", &text[..text.len() - 1], &text[1..]);
        match from_slice(text.as_bytes()) {
            Err(StrictError::DuplicateKey(m)) => assert!(m.len() < 200, "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broken_json_is_a_syntax_error() {
        for text in ["{", r#"{"a":}"#, "", "{\"a\":1} x"] {
            assert!(
                matches!(from_slice(text.as_bytes()), Err(StrictError::Syntax(_))),
                "{text}"
            );
        }
    }
}
