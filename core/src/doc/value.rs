//! Conversions between the JSON that Optiverse clients speak and the values stored in the Yjs
//! document.
//!
//! Integers stay integers and floats stay floats in both directions (yrs keeps `Number::Int`
//! and `Number::Float` apart), so a Python client gets `7` back for `n_rays` and `100.0` for
//! `x_mm`. Reading from the document is depth-bounded: a Yjs client may nest shared types
//! arbitrarily deep, and an unbounded recursion would overflow the stack.

use serde_json::{Map, Number as JsonNumber, Value};
use yrs::types::ToJson;
use yrs::{Any, Array, GetString, Map as _, Out, ReadTxn};

/// Deepest nesting of arrays/objects accepted in a field value, both from JSON and from Yjs.
pub const MAX_VALUE_DEPTH: usize = 32;

/// The fields of one item, keyed by field name.
pub type ItemFields = Map<String, Value>;

/// Converts a client JSON value into a Yjs `Any`.
pub fn json_to_any(value: &Value) -> Any {
    match value {
        Value::Null => Any::Null,
        Value::Bool(b) => Any::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Any::Number(yrs::any::Number::Int(i))
            } else {
                Any::Number(yrs::any::Number::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Any::String(s.as_str().into()),
        Value::Array(items) => Any::Array(items.iter().map(json_to_any).collect()),
        Value::Object(map) => Any::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_any(v)))
                .collect::<std::collections::HashMap<_, _>>()
                .into(),
        ),
    }
}

/// Nesting depth of a JSON value (a scalar is depth 0).
pub fn json_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn number_to_json(n: &yrs::any::Number) -> Value {
    match *n {
        yrs::any::Number::Int(i) => Value::Number(i.into()),
        yrs::any::Number::Float(f) => JsonNumber::from_f64(f).map_or(Value::Null, Value::Number),
    }
}

/// Converts a Yjs `Any` into JSON; values nested deeper than [`MAX_VALUE_DEPTH`] become `null`.
pub fn any_to_json(any: &Any) -> Value {
    any_to_json_at(any, 0)
}

fn any_to_json_at(any: &Any, depth: usize) -> Value {
    if depth > MAX_VALUE_DEPTH {
        return Value::Null;
    }
    match any {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(b) => Value::Bool(*b),
        Any::Number(n) => number_to_json(n),
        Any::String(s) => Value::String(s.to_string()),
        Any::Buffer(bytes) => Value::Array(bytes.iter().map(|b| Value::from(*b)).collect()),
        Any::Array(items) => {
            Value::Array(items.iter().map(|v| any_to_json_at(v, depth + 1)).collect())
        }
        Any::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), any_to_json_at(v, depth + 1)))
                .collect(),
        ),
    }
}

/// Converts a value read from the document into JSON, bounded in depth like [`any_to_json`].
pub fn out_to_json<T: ReadTxn>(txn: &T, out: &Out) -> Value {
    out_to_json_at(txn, out, 0)
}

fn out_to_json_at<T: ReadTxn>(txn: &T, out: &Out, depth: usize) -> Value {
    if depth > MAX_VALUE_DEPTH {
        return Value::Null;
    }
    match out {
        Out::Any(any) => any_to_json_at(any, depth),
        Out::YText(text) => Value::String(text.get_string(txn)),
        Out::YXmlText(text) => Value::String(text.get_string(txn)),
        Out::YArray(array) => Value::Array(
            array
                .iter(txn)
                .map(|v| out_to_json_at(txn, &v, depth + 1))
                .collect(),
        ),
        Out::YMap(map) => Value::Object(
            map.iter(txn)
                .map(|(k, v)| (k.to_string(), out_to_json_at(txn, &v, depth + 1)))
                .collect(),
        ),
        Out::YXmlElement(el) => Value::String(el.get_string(txn)),
        Out::YXmlFragment(frag) => Value::String(frag.get_string(txn)),
        Out::YDoc(doc) => Value::String(doc.guid().to_string()),
        other => any_to_json_at(&other.to_json(txn), depth),
    }
}

/// Equality as a person reads JSON: `1` equals `1.0`. Client dicts and document values travel
/// through different number representations, so structural equality would see changes that
/// are not there.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_keep_their_kind_through_any() {
        let v = json!({"n_rays": 7, "x_mm": 100.0, "neg": -3, "pi": 3.25});
        let back = any_to_json(&json_to_any(&v));
        assert_eq!(back, v);
        assert_eq!(back["x_mm"].to_string(), "100.0");
        assert_eq!(back["n_rays"].to_string(), "7");
    }

    #[test]
    fn nested_values_round_trip() {
        let v = json!({"interfaces": [{"x1_mm": 0.0, "element_type": "lens", "ok": true, "none": null}]});
        assert_eq!(any_to_json(&json_to_any(&v)), v);
    }

    #[test]
    fn json_equal_treats_int_and_float_alike() {
        assert!(json_equal(&json!(1), &json!(1.0)));
        assert!(json_equal(&json!([1, {"a": 2.0}]), &json!([1.0, {"a": 2}])));
        assert!(!json_equal(&json!(1), &json!(1.5)));
        assert!(!json_equal(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }

    #[test]
    fn depth_is_measured_and_bounded() {
        let mut v = json!(1);
        for _ in 0..(MAX_VALUE_DEPTH + 5) {
            v = json!([v]);
        }
        assert_eq!(json_depth(&v), MAX_VALUE_DEPTH + 5);
        let mut depth = 0;
        let mut cur = &any_to_json(&json_to_any(&v));
        while let Value::Array(items) = cur {
            depth += 1;
            cur = &items[0];
        }
        assert!(depth <= MAX_VALUE_DEPTH + 1);
    }
}
