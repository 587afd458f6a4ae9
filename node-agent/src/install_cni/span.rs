//! Byte spans inside a JSON text: the members of an object and the elements of an array.
//!
//! The installer edits CNI config files by splicing its own entry in and out of the text, so
//! that everything it does not own (key order, unknown fields, number spelling, whitespace,
//! escapes) stays byte for byte as it was. serde_json parses and validates; this module only
//! locates things, and is only ever run on text serde_json has already accepted.

use std::ops::Range;

/// One `"key": value` member of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The key, unescaped.
    pub key: String,
    /// The value's bytes (no surrounding whitespace).
    pub value: Range<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed JSON at byte {at}: {what}")]
pub struct SpanError {
    pub at: usize,
    pub what: &'static str,
}

fn err<T>(at: usize, what: &'static str) -> Result<T, SpanError> {
    Err(SpanError { at, what })
}

/// The span of the document's single top-level value (leading/trailing whitespace excluded).
pub fn root(text: &str) -> Result<Range<usize>, SpanError> {
    let b = text.as_bytes();
    let start = skip_ws(b, 0);
    let end = value_end(b, start)?;
    if skip_ws(b, end) != b.len() {
        return err(end, "trailing characters after the value");
    }
    Ok(start..end)
}

/// The members of the object at `obj` (which must start with `{`), in document order.
pub fn members(text: &str, obj: Range<usize>) -> Result<Vec<Member>, SpanError> {
    let b = &text.as_bytes()[..obj.end];
    if b.get(obj.start) != Some(&b'{') {
        return err(obj.start, "expected an object");
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, obj.start + 1);
    if b.get(i) == Some(&b'}') {
        return Ok(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return err(i, "expected a key");
        }
        let key_end = string_end(b, i)?;
        let key: String = serde_json::from_str(&text[i..key_end]).map_err(|_| SpanError {
            at: i,
            what: "bad key",
        })?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return err(i, "expected ':'");
        }
        let vstart = skip_ws(b, i + 1);
        let vend = value_end(b, vstart)?;
        out.push(Member {
            key,
            value: vstart..vend,
        });
        i = skip_ws(b, vend);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Ok(out),
            _ => return err(i, "expected ',' or '}'"),
        }
    }
}

/// The elements of the array at `arr` (which must start with `[`), in document order.
pub fn elements(text: &str, arr: Range<usize>) -> Result<Vec<Range<usize>>, SpanError> {
    let b = &text.as_bytes()[..arr.end];
    if b.get(arr.start) != Some(&b'[') {
        return err(arr.start, "expected an array");
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, arr.start + 1);
    if b.get(i) == Some(&b']') {
        return Ok(out);
    }
    loop {
        let end = value_end(b, i)?;
        out.push(i..end);
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => return Ok(out),
            _ => return err(i, "expected ',' or ']'"),
        }
    }
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i` (a `"`).
fn string_end(b: &[u8], i: usize) -> Result<usize, SpanError> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    err(i, "unterminated string")
}

/// End (exclusive) of the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Result<usize, SpanError> {
    match b.get(i) {
        None => err(i, "expected a value"),
        Some(b'"') => string_end(b, i),
        Some(b'{') | Some(b'[') => {
            // Nesting depth only; the brackets' pairing was checked by serde_json.
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            err(i, "unterminated object or array")
        }
        Some(_) => {
            // A number or a literal: runs until a delimiter.
            let mut j = i;
            while j < b.len() && !is_ws(b[j]) && !matches!(b[j], b',' | b'}' | b']' | b':') {
                j += 1;
            }
            if j == i {
                return err(i, "expected a value");
            }
            Ok(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_in_document_order_with_exact_spans() {
        let t =
            "\n {\"z\": 1, \"a\\u0041\" : [1, {\"x\": \"]}\\\"\"}] ,\"m\":{}, \"n\": -1.50e3 }\n";
        let r = root(t).unwrap();
        assert_eq!(&t[r.clone()], t.trim());
        let m = members(t, r).unwrap();
        let keys: Vec<_> = m.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["z", "aA", "m", "n"]);
        assert_eq!(&t[m[0].value.clone()], "1");
        assert_eq!(&t[m[1].value.clone()], "[1, {\"x\": \"]}\\\"\"}]");
        assert_eq!(&t[m[2].value.clone()], "{}");
        assert_eq!(&t[m[3].value.clone()], "-1.50e3");
        let e = elements(t, m[1].value.clone()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(&t[e[1].clone()], "{\"x\": \"]}\\\"\"}");
    }

    #[test]
    fn empty_containers_and_errors() {
        assert!(members("{ }", 0..3).unwrap().is_empty());
        assert!(elements("[\n]", 0..3).unwrap().is_empty());
        assert!(members("[]", 0..2).is_err());
        assert!(root("{} x").is_err());
        assert!(root("").is_err());
        assert!(root("\"abc").is_err());
    }
}
