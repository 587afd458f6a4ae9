//! The CNI config files, as text: which files count (libcni's rules), whether one is usable,
//! and the three edits the installer makes, each a splice that leaves every byte it does not own
//! untouched:
//!
//! * [`with_entry`]: our entry appended at the end of a `.conflist`'s `plugins` (or an existing
//!   `ambient-cni` entry replaced in place); `None` when the file already says what we want.
//! * [`convert`]: a single-plugin `.conf`/`.json` turned into a `.conflist` with the same `name`
//!   and `cniVersion`, the original object as the first plugin (re-indented only) and our entry
//!   second. Our entry records the conversion under [`CONVERTED_KEY`]: the original file name and
//!   its exact text, so uninstall can put the `.conf` back byte for byte.
//! * [`without_entry`]: our entry removed, together with the separator in front of it, which
//!   undoes [`with_entry`] exactly.

use std::ops::Range;

use serde_json::{Map, Value};

use super::span::{self, Member};

/// The plugin type of our entry, and the name of the binary in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "ambient-cni";
/// Key inside our entry recording a `.conf` → `.conflist` conversion:
/// `{"file": "<original file name>", "content": "<its exact text>"}`.
/// The plugin ignores keys it does not know, so the record travels safely with the file.
pub const CONVERTED_KEY: &str = "_ambientConvertedFrom";
/// The extensions libcni's `ConfFiles` accepts, as kubelet and the runtimes call it.
pub const EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// How libcni reads a file: `.conflist` as a list, anything else as a single network config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    List,
    Single,
}

/// The extension as Go's `filepath.Ext` sees it (so `.conf`, a hidden file, has one).
pub fn go_ext(name: &str) -> &str {
    name.rfind('.').map(|i| &name[i..]).unwrap_or("")
}

/// Whether libcni's `ConfFiles` would list this file name, and as what.
pub fn kind_of(name: &str) -> Option<Kind> {
    let ext = go_ext(name);
    if !EXTENSIONS.contains(&ext) {
        return None;
    }
    Some(if ext == ".conflist" {
        Kind::List
    } else {
        Kind::Single
    })
}

/// Why a config file cannot be used; the caller names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the file is empty")]
    Empty,
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(String),
}

/// A usable config file's parsed form.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub kind: Kind,
    pub value: Value,
}

impl Parsed {
    /// Whether one of the plugins is ours.
    pub fn has_entry(&self) -> bool {
        match self.kind {
            Kind::List => self.value["plugins"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(is_ours)),
            Kind::Single => false,
        }
    }

    /// The `file` of our entry's conversion record, if it has one.
    pub fn converted_from(&self) -> Option<String> {
        let ps = self.value["plugins"].as_array()?;
        ps.iter()
            .find(|p| is_ours(p))
            .and_then(|p| p[CONVERTED_KEY]["file"].as_str())
            .map(str::to_string)
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"].as_str() == Some(PLUGIN_TYPE)
}

/// Parses and checks a file as libcni does before a runtime would use it: a `.conflist` needs a
/// string `name`, a non-empty `plugins` list and a `type` in every plugin; any other file is a
/// single network config and needs a `type`.
pub fn parse(kind: Kind, text: &str) -> Result<Parsed, Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::Empty);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| Invalid::Json(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| Invalid::Shape("the top level is not a JSON object".into()))?;
    if let Some(v) = obj.get("cniVersion") {
        if !v.is_string() {
            return Err(Invalid::Shape("cniVersion is not a string".into()));
        }
    }
    match kind {
        Kind::List => {
            match obj.get("name") {
                Some(Value::String(_)) => {}
                Some(_) => return Err(Invalid::Shape("name is not a string".into())),
                None => return Err(Invalid::Shape("no name".into())),
            }
            let plugins = match obj.get("plugins") {
                Some(Value::Array(p)) => p,
                Some(_) => return Err(Invalid::Shape("plugins is not a list".into())),
                None => return Err(Invalid::Shape("no 'plugins' key".into())),
            };
            if plugins.is_empty() {
                return Err(Invalid::Shape("no plugins in the list".into()));
            }
            for (i, p) in plugins.iter().enumerate() {
                if !p.is_object() {
                    return Err(Invalid::Shape(format!("plugin {i} is not an object")));
                }
                if p["type"].as_str().is_none_or(str::is_empty) {
                    return Err(Invalid::Shape(format!("plugin {i} has no 'type'")));
                }
            }
        }
        Kind::Single => {
            if obj
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                let hint = if obj.contains_key("plugins") {
                    "; is this a .conflist?"
                } else {
                    ""
                };
                return Err(Invalid::Shape(format!("no 'type'{hint}")));
            }
        }
    }
    Ok(Parsed { kind, value })
}

/// Our entry, keys in the order they were given (`type` first when it had to be added).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    members: Vec<(String, Value)>,
}

impl Entry {
    /// From the `--plugin-config` JSON object text.
    pub fn from_json(text: &str) -> Result<Entry, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if !value.is_object() {
            return Err("not a JSON object".into());
        }
        let root = span::root(text).map_err(|e| e.to_string())?;
        let mut members = Vec::new();
        for Member { key, value } in span::members(text, root).map_err(|e| e.to_string())? {
            let v: Value = serde_json::from_str(&text[value]).map_err(|e| e.to_string())?;
            if let Some(i) = members.iter().position(|(k, _)| *k == key) {
                // JSON with a duplicate key: the last one wins, as in every Go/serde decoder.
                members.remove(i);
            }
            members.push((key, v));
        }
        match members.iter().find(|(k, _)| k == "type") {
            Some((_, Value::String(t))) if t == PLUGIN_TYPE => {}
            Some((_, t)) => return Err(format!("type must be {PLUGIN_TYPE:?}, not {t}")),
            None => members.insert(0, ("type".into(), Value::String(PLUGIN_TYPE.into()))),
        }
        if members.iter().any(|(k, _)| k == CONVERTED_KEY) {
            return Err(format!("{CONVERTED_KEY} is the installer's own key"));
        }
        Ok(Entry { members })
    }

    /// The default entry: the plugin with the agent's socket.
    pub fn default_entry() -> Entry {
        Entry {
            members: vec![
                ("type".into(), Value::String(PLUGIN_TYPE.into())),
                (
                    "agentSocket".into(),
                    Value::String(ambient_net::consts::DEFAULT_AGENT_SOCKET.into()),
                ),
            ],
        }
    }

    fn as_value(&self) -> Value {
        Value::Object(self.members.iter().cloned().collect::<Map<_, _>>())
    }

    /// Whether `existing` (an entry found in a file) says what this entry says, ignoring the
    /// conversion record.
    fn matches(&self, existing: &Value) -> bool {
        let mut e = existing.clone();
        if let Some(o) = e.as_object_mut() {
            o.remove(CONVERTED_KEY);
        }
        e == self.as_value()
    }

    /// Renders the entry: one member per line under `indent` when `style` is multi-line.
    fn render(&self, converted: Option<&str>, style: &Style, indent: &str) -> String {
        let colon = if style.multiline { ": " } else { ":" };
        let mut parts: Vec<String> = self
            .members
            .iter()
            .map(|(k, v)| format!("{}{colon}{}", Value::String(k.clone()), v))
            .collect();
        if let Some(raw) = converted {
            parts.push(format!(
                "{}{colon}{}",
                Value::String(CONVERTED_KEY.into()),
                raw
            ));
        }
        if !style.multiline {
            return format!("{{{}}}", parts.join(","));
        }
        let nl = style.newline;
        let inner = format!("{indent}{}", style.unit);
        let body: Vec<String> = parts.iter().map(|p| format!("{inner}{p}")).collect();
        format!("{{{nl}{}{nl}{indent}}}", body.join(&format!(",{nl}")))
    }
}

/// The formatting conventions of a file, so what we insert looks like what is there.
#[derive(Debug, Clone)]
struct Style {
    newline: &'static str,
    /// One level of indentation.
    unit: String,
    multiline: bool,
}

impl Style {
    fn of(text: &str, root: &Range<usize>) -> Style {
        let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
        // The indentation of the first member of the top-level object, when it has its own line.
        let inside = &text[root.start + 1..root.end];
        let unit = inside
            .find('\n')
            .map(|i| {
                inside[i + 1..]
                    .chars()
                    .take_while(|c| *c == ' ' || *c == '\t')
                    .collect::<String>()
            })
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "  ".into());
        Style {
            newline,
            unit,
            multiline: text[root.clone()].contains('\n'),
        }
    }
}

/// The whitespace from the start of the line holding `pos` up to `pos`, if only whitespace is
/// there (the element starts its own line).
fn line_indent(text: &str, pos: usize) -> Option<&str> {
    let line_start = text[..pos].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let lead = &text[line_start..pos];
    lead.chars().all(|c| c == ' ' || c == '\t').then_some(lead)
}

/// The spans of a `.conflist`'s document, its `plugins` array and each plugin.
struct ListSpans {
    root: Range<usize>,
    plugins: Range<usize>,
    elements: Vec<Range<usize>>,
}

fn list_spans(text: &str) -> Result<ListSpans, String> {
    let root = span::root(text).map_err(|e| e.to_string())?;
    let members = span::members(text, root.clone()).map_err(|e| e.to_string())?;
    // With duplicate keys the last one is what decoders see.
    let plugins = members
        .iter()
        .rev()
        .find(|m| m.key == "plugins")
        .map(|m| m.value.clone())
        .ok_or("no 'plugins' key")?;
    let elements = span::elements(text, plugins.clone()).map_err(|e| e.to_string())?;
    Ok(ListSpans {
        root,
        plugins,
        elements,
    })
}

fn element_value(text: &str, span: &Range<usize>) -> Value {
    serde_json::from_str(&text[span.clone()]).unwrap_or(Value::Null)
}

/// The indentation and layout to use for an element placed like `near` (an element of the list).
fn element_layout(text: &str, s: &ListSpans, near: &Range<usize>) -> (Style, String) {
    let mut style = Style::of(text, &s.root);
    let sep_start = s
        .elements
        .iter()
        .take_while(|e| e.start < near.start)
        .last()
        .map(|e| e.end)
        .unwrap_or(s.plugins.start + 1);
    let own_line = text[sep_start..near.start].contains('\n');
    match line_indent(text, near.start).filter(|_| own_line) {
        Some(indent) => (style, indent.to_string()),
        None => {
            style.multiline = false;
            (style, String::new())
        }
    }
}

/// The `.conflist` text with our entry present and equal to `entry`, or `None` when it already
/// is. An existing entry of ours is replaced where it stands (its conversion record kept); a
/// second one is removed; otherwise the entry is appended after the last plugin.
pub fn with_entry(text: &str, entry: &Entry) -> Result<Option<String>, String> {
    let s = list_spans(text)?;
    let ours: Vec<usize> = (0..s.elements.len())
        .filter(|i| is_ours(&element_value(text, &s.elements[*i])))
        .collect();
    let Some(&first) = ours.first() else {
        let last = s.elements.last().ok_or("no plugins in the list")?;
        let (style, indent) = element_layout(text, &s, last);
        let rendered = entry.render(None, &style, &indent);
        let sep = if style.multiline {
            format!(",{}{indent}", style.newline)
        } else {
            // The list's own separator (say "," or ", ") when it has one to copy.
            match s.elements.len() {
                1 => ",".to_string(),
                n => text[s.elements[n - 2].end..s.elements[n - 1].start].to_string(),
            }
        };
        let mut out = String::with_capacity(text.len() + rendered.len() + sep.len());
        out.push_str(&text[..last.end]);
        out.push_str(&sep);
        out.push_str(&rendered);
        out.push_str(&text[last.end..]);
        return Ok(Some(out));
    };
    let span = s.elements[first].clone();
    let existing = element_value(text, &span);
    let mut out = text.to_string();
    // Extra copies go first (from the back), so `span` stays valid.
    for &i in ours[1..].iter().rev() {
        out.replace_range(removal_range(&s, i), "");
    }
    if !entry.matches(&existing) {
        let (style, indent) = element_layout(text, &s, &span);
        let raw_record = existing
            .get(CONVERTED_KEY)
            .map(|v| serde_json::to_string(v).unwrap_or_default());
        out.replace_range(span, &entry.render(raw_record.as_deref(), &style, &indent));
    }
    Ok((out != text).then_some(out))
}

/// The bytes to delete to remove element `i`: from the end of the element before it (so the
/// separator we inserted goes too), or up to the next element when it is the first.
fn removal_range(s: &ListSpans, i: usize) -> Range<usize> {
    let e = &s.elements[i];
    if i > 0 {
        s.elements[i - 1].end..e.end
    } else if let Some(next) = s.elements.get(1) {
        e.start..next.start
    } else {
        e.start..e.end
    }
}

/// The result of removing our entry from a `.conflist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// Write this text back to the same file.
    Rewrite(String),
    /// The file was a conversion of ours and is otherwise untouched: put `content` back as
    /// `file` and delete the `.conflist`.
    Restore { file: String, content: String },
}

/// The `.conflist` text without our entry, or `None` when it has none.
pub fn without_entry(text: &str) -> Result<Option<Removed>, String> {
    let s = list_spans(text)?;
    let ours: Vec<usize> = (0..s.elements.len())
        .filter(|i| is_ours(&element_value(text, &s.elements[*i])))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let record = ours.iter().find_map(|i| {
        element_value(text, &s.elements[*i])
            .get(CONVERTED_KEY)
            .cloned()
    });
    let mut out = text.to_string();
    for &i in ours.iter().rev() {
        out.replace_range(removal_range(&s, i), "");
    }
    if let Some(restore) = record.and_then(|r| restorable(&r, &out)) {
        return Ok(Some(restore));
    }
    Ok(Some(Removed::Rewrite(out)))
}

/// The original `.conf` back, when the record is well-formed and the list (without our entry) is
/// still exactly what the conversion made of it: same name and cniVersion, one plugin equal to
/// the original. Otherwise someone changed the list since, and it stays a `.conflist`.
fn restorable(record: &Value, list_without_us: &str) -> Option<Removed> {
    let file = record["file"].as_str()?;
    let content = record["content"].as_str()?;
    if file.contains('/') || file.starts_with('.') || kind_of(file) != Some(Kind::Single) {
        return None;
    }
    let original: Value = serde_json::from_str(content).ok()?;
    let list: Value = serde_json::from_str(list_without_us).ok()?;
    let plugins = list["plugins"].as_array()?;
    let same = plugins.len() == 1
        && plugins[0] == original
        && list["name"]
            == original
                .get("name")
                .cloned()
                .unwrap_or(Value::String("".into()))
        && list.get("cniVersion") == original.get("cniVersion")
        && list.as_object()?.len() == 2 + usize::from(original.get("cniVersion").is_some());
    same.then(|| Removed::Restore {
        file: file.to_string(),
        content: content.to_string(),
    })
}

/// A single-plugin config (`file` is its name, `text` its content) as a `.conflist` with our
/// entry appended, as libcni's `ConfListFromConf` would see it: the list takes the config's
/// `name` (empty when it has none, as libcni does) and `cniVersion`, and the config itself,
/// untouched except for indentation, is the first plugin.
pub fn convert(file: &str, text: &str, entry: &Entry) -> Result<String, String> {
    let root = span::root(text).map_err(|e| e.to_string())?;
    let members = span::members(text, root.clone()).map_err(|e| e.to_string())?;
    let raw = |key: &str| {
        members
            .iter()
            .rev()
            .find(|m| m.key == key)
            .map(|m| text[m.value.clone()].to_string())
    };
    let mut style = Style::of(text, &root);
    style.multiline = true;
    let nl = style.newline;
    let u = style.unit.clone();
    let inner = format!("{u}{u}");
    let original = text[root.clone()].replace('\n', &format!("\n{inner}"));
    let record = format!(
        "{{\"file\":{},\"content\":{}}}",
        Value::String(file.into()),
        Value::String(text.into())
    );
    let ours = entry.render(Some(&record), &style, &inner);
    let mut out = format!("{{{nl}");
    if let Some(v) = raw("cniVersion") {
        out.push_str(&format!("{u}\"cniVersion\": {v},{nl}"));
    }
    let name = raw("name").unwrap_or_else(|| "\"\"".into());
    out.push_str(&format!("{u}\"name\": {name},{nl}"));
    out.push_str(&format!("{u}\"plugins\": [{nl}"));
    out.push_str(&format!("{inner}{original},{nl}{inner}{ours}{nl}"));
    out.push_str(&format!("{u}]{nl}}}"));
    // Whatever followed the original object (usually one newline) follows the list too.
    out.push_str(&text[root.end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry::from_json(r#"{"type":"ambient-cni","agentSocket":"/s"}"#).unwrap()
    }

    #[test]
    fn extensions_as_libcni() {
        assert_eq!(kind_of("10-a.conflist"), Some(Kind::List));
        assert_eq!(kind_of("10-a.conf"), Some(Kind::Single));
        assert_eq!(kind_of("10-a.json"), Some(Kind::Single));
        assert_eq!(kind_of(".conf"), Some(Kind::Single));
        assert_eq!(kind_of("10-a.conf.bak"), None);
        assert_eq!(kind_of(".10-a.conflist.ambient-tmp"), None);
        assert_eq!(kind_of("README"), None);
    }

    #[test]
    fn libcni_validity() {
        assert_eq!(parse(Kind::List, " \n"), Err(Invalid::Empty));
        assert!(matches!(parse(Kind::List, "{"), Err(Invalid::Json(_))));
        let no_name = r#"{"plugins":[{"type":"a"}]}"#;
        assert_eq!(
            parse(Kind::List, no_name).unwrap_err().to_string(),
            "no name"
        );
        let empty = r#"{"name":"n","plugins":[]}"#;
        assert!(parse(Kind::List, empty).is_err());
        let untyped = r#"{"name":"n","plugins":[{"x":1}]}"#;
        assert!(parse(Kind::List, untyped).is_err());
        let list_in_conf = r#"{"name":"n","plugins":[{"type":"a"}]}"#;
        assert!(parse(Kind::Single, list_in_conf)
            .unwrap_err()
            .to_string()
            .contains(".conflist"));
        assert!(parse(Kind::Single, r#"{"name":"n","type":"ptp"}"#).is_ok());
    }

    #[test]
    fn entry_keeps_given_order_and_adds_type() {
        let e = Entry::from_json(r#"{"logFile":"/l","failOpen":true}"#).unwrap();
        let keys: Vec<_> = e.members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["type", "logFile", "failOpen"]);
        assert!(Entry::from_json(r#"{"type":"calico"}"#).is_err());
        assert!(Entry::from_json("[1]").is_err());
        assert!(Entry::from_json(r#"{"_ambientConvertedFrom":1}"#).is_err());
    }

    #[test]
    fn append_then_remove_is_identity_multiline() {
        let t = "{\n  \"name\": \"n\",\n  \"plugins\": [\n    {\"type\": \"ptp\"},\n    {\n      \"type\": \"portmap\"\n    }\n  ]\n}\n";
        let with = with_entry(t, &entry()).unwrap().unwrap();
        assert_eq!(
            with,
            "{\n  \"name\": \"n\",\n  \"plugins\": [\n    {\"type\": \"ptp\"},\n    {\n      \"type\": \"portmap\"\n    },\n    {\n      \"type\": \"ambient-cni\",\n      \"agentSocket\": \"/s\"\n    }\n  ]\n}\n"
        );
        assert_eq!(with_entry(&with, &entry()).unwrap(), None);
        assert_eq!(
            without_entry(&with).unwrap(),
            Some(Removed::Rewrite(t.into()))
        );
        assert_eq!(without_entry(t).unwrap(), None);
    }

    #[test]
    fn append_compact_and_tabs_and_crlf() {
        let t = r#"{"name":"n","plugins":[{"type":"a"},{"type":"b"}]}"#;
        let with = with_entry(t, &entry()).unwrap().unwrap();
        assert_eq!(
            with,
            r#"{"name":"n","plugins":[{"type":"a"},{"type":"b"},{"type":"ambient-cni","agentSocket":"/s"}]}"#
        );
        assert_eq!(
            without_entry(&with).unwrap(),
            Some(Removed::Rewrite(t.into()))
        );

        let t = "{\r\n\t\"name\": \"n\",\r\n\t\"plugins\": [\r\n\t\t{\"type\": \"a\"}\r\n\t]\r\n}";
        let with = with_entry(t, &entry()).unwrap().unwrap();
        assert!(with.contains(
            "{\"type\": \"a\"},\r\n\t\t{\r\n\t\t\t\"type\": \"ambient-cni\",\r\n\t\t\t\"agentSocket\": \"/s\"\r\n\t\t}\r\n\t]"
        ));
        assert_eq!(
            without_entry(&with).unwrap(),
            Some(Removed::Rewrite(t.into()))
        );
    }

    #[test]
    fn existing_entry_replaced_in_place_and_duplicates_dropped() {
        let t = r#"{"name":"n","plugins":[{"type":"ambient-cni","agentSocket":"/old"},{"type":"b"},{"type":"ambient-cni"}]}"#;
        let with = with_entry(t, &entry()).unwrap().unwrap();
        assert_eq!(
            with,
            r#"{"name":"n","plugins":[{"type":"ambient-cni","agentSocket":"/s"},{"type":"b"}]}"#
        );
        // Same content, other key order: nothing to do.
        let t2 =
            r#"{"name":"n","plugins":[{"type":"a"},{"agentSocket":"/s","type":"ambient-cni"}]}"#;
        assert_eq!(with_entry(t2, &entry()).unwrap(), None);
    }

    #[test]
    fn convert_and_restore_byte_for_byte() {
        let conf = "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"mynet\",\n  \"type\": \"ptp\",\n  \"ipam\": {\"type\": \"host-local\"}\n}\n";
        let list = convert("10-ptp.conf", conf, &entry()).unwrap();
        let v = parse(Kind::List, &list).unwrap();
        assert_eq!(v.value["name"], "mynet");
        assert_eq!(v.value["cniVersion"], "0.3.1");
        let orig: Value = serde_json::from_str(conf).unwrap();
        assert_eq!(v.value["plugins"][0], orig);
        assert_eq!(v.value["plugins"][1]["type"], PLUGIN_TYPE);
        assert_eq!(v.converted_from().as_deref(), Some("10-ptp.conf"));
        assert!(list.ends_with("]\n}\n"));
        // Idempotent on the converted list.
        assert_eq!(with_entry(&list, &entry()).unwrap(), None);
        // A changed option is replaced in place, and the record survives.
        let other = Entry::from_json(r#"{"agentSocket":"/t"}"#).unwrap();
        let list2 = with_entry(&list, &other).unwrap().unwrap();
        assert_eq!(
            parse(Kind::List, &list2)
                .unwrap()
                .converted_from()
                .as_deref(),
            Some("10-ptp.conf")
        );
        assert_eq!(
            without_entry(&list2).unwrap(),
            Some(Removed::Restore {
                file: "10-ptp.conf".into(),
                content: conf.into()
            })
        );
        // Someone added a plugin after the conversion: it stays a list, minus our entry.
        let edited = list.replacen("\"plugins\": [", "\"plugins\": [{\"type\": \"tuning\"},", 1);
        assert!(matches!(
            without_entry(&edited).unwrap(),
            Some(Removed::Rewrite(_))
        ));
    }
}
