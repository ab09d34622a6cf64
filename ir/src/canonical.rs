//! Canonical JSON, RFC 8785 (JSON Canonicalization Scheme).
//!
//! Digests and signatures in mvm are taken over this form, so two documents that mean the same
//! thing hash the same: object members sorted by their UTF-16 code units, no insignificant white
//! space, strings with only the escapes JCS allows, and numbers in ECMAScript's shortest
//! round-trip form (`1e+30`, `0.002`, `-0` written `0`). An integer that an IEEE 754 double cannot
//! hold exactly is refused rather than silently rounded.

use serde::Serialize;
use serde_json::{Number, Value};

use crate::Error;

/// The canonical JSON bytes of any serializable value.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let value = serde_json::to_value(value).map_err(|e| Error::parse("value", e))?;
    value_to_vec(&value)
}

/// The canonical JSON bytes of a JSON text.
pub fn canonicalize(json: &[u8]) -> Result<Vec<u8>, Error> {
    let value: Value = serde_json::from_slice(json).map_err(|e| Error::parse("JSON", e))?;
    value_to_vec(&value)
}

/// The canonical JSON bytes of a parsed JSON value.
pub fn value_to_vec(value: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    write_value(value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), Error> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_number(n, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Largest integer magnitude up to which every integer is an exact double.
const MAX_EXACT_INTEGER: u64 = 1 << 53;

fn write_number(n: &Number, out: &mut Vec<u8>) -> Result<(), Error> {
    let (double, exact) = if let Some(u) = n.as_u64() {
        (u as f64, u <= MAX_EXACT_INTEGER)
    } else if let Some(i) = n.as_i64() {
        (i as f64, i.unsigned_abs() <= MAX_EXACT_INTEGER)
    } else {
        // serde_json parses every other number as a finite f64.
        (
            n.as_f64()
                .ok_or_else(|| Error::InexactNumber(n.to_string()))?,
            true,
        )
    };
    let mut buf = ryu_js::Buffer::new();
    let text = buf.format(double);
    // A large integer is kept only if its double prints back as the same digits; otherwise
    // canonicalization would silently change the number.
    if !exact && text != n.to_string() {
        return Err(Error::InexactNumber(n.to_string()));
    }
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{9}' => out.extend_from_slice(b"\\t"),
            '\u{a}' => out.extend_from_slice(b"\\n"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\u{d}' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canon(json: &str) -> String {
        String::from_utf8(canonicalize(json.as_bytes()).unwrap()).unwrap()
    }

    /// RFC 8785 §3.2.2, the worked example of the whole transformation.
    #[test]
    fn rfc8785_main_example() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            canon(input),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    /// RFC 8785 §3.2.3, sorting by UTF-16 code units (the emoji's surrogates sort before U+FB33).
    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let out = canon(input);
        let order = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small Letter O With Diaeresis",
            "Euro Sign",
            "Emoji: Grinning Face",
            "Hebrew Letter Dalet With Dagesh",
        ];
        let mut last = 0;
        for name in order {
            let at = out.find(name).unwrap();
            assert!(at > last, "{name} out of order in {out}");
            last = at;
        }
    }

    /// RFC 8785 Appendix B: IEEE 754 bit patterns and their ECMAScript serializations.
    #[test]
    fn rfc8785_number_table() {
        let table: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in table {
            let number = Number::from_f64(f64::from_bits(bits)).unwrap();
            let out = value_to_vec(&Value::Number(number)).unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "bits {bits:#018x}"
            );
        }
    }

    #[test]
    fn control_characters_and_escapes() {
        // DEL (U+007F) is not a control character to JCS: it is written as is.
        assert_eq!(
            canon(r#""\u0000\u001f\u007f\b\t\n\f\r""#),
            "\"\\u0000\\u001f\u{7f}\\b\\t\\n\\f\\r\""
        );
        assert_eq!(canon(r#""\u2028 é""#), "\"\u{2028} é\"");
    }

    #[test]
    fn inexact_integers_are_refused() {
        assert_eq!(canon("9007199254740992"), "9007199254740992");
        assert_eq!(
            canonicalize(b"9007199254740993").unwrap_err().code(),
            "INPUT004"
        );
        assert_eq!(canonicalize(b"-18446744073").unwrap(), b"-18446744073");
        // Beyond 2^53 an integer whose double prints back the same is kept.
        assert_eq!(canon("117500119972289810"), "117500119972289810");
        assert_eq!(
            canonicalize(b"18446744073709551615").unwrap_err().code(),
            "INPUT004"
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-(1i64 << 53)..(1i64 << 53)).prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Canonical output parses back to the same value and is a fixed point.
        #[test]
        fn canonical_form_is_stable(value in json_value()) {
            let once = value_to_vec(&value).unwrap();
            let reparsed: Value = serde_json::from_slice(&once).unwrap();
            let twice = value_to_vec(&reparsed).unwrap();
            prop_assert_eq!(&once, &twice);
            // Same meaning: numbers compare as doubles.
            prop_assert!(same_meaning(&value, &reparsed));
        }

        /// White space and member order in the input do not change the canonical bytes.
        #[test]
        fn formatting_does_not_matter(value in json_value()) {
            let pretty = serde_json::to_vec_pretty(&value).unwrap();
            let compact = serde_json::to_vec(&value).unwrap();
            prop_assert_eq!(canonicalize(&pretty).unwrap(), canonicalize(&compact).unwrap());
        }
    }

    fn same_meaning(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_meaning(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_meaning(v, w)))
            }
            _ => a == b,
        }
    }
}
