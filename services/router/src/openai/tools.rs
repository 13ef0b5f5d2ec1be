//! Tool calling for `/v1/chat/completions`: `tools`, `tool_choice` (`none`, `auto`,
//! `required`, a named function) and the history of earlier calls, on models whose chat
//! template has no tool syntax of its own (SmolLM2's ChatML has none). The tools are described
//! to the model in the system message; a call is written `<tool_call>{"name": ...,
//! "arguments": {...}}</tool_call>`, and the reply is decoded under a Lark grammar (llguidance,
//! on the worker) that embeds each function's parameter schema, so a call always parses and its
//! arguments validate: `required` and a named function allow only a call, `auto` a call or text
//! (not starting with `<`). The reply is parsed back into `tool_calls` with `finish_reason:
//! "tool_calls"`, streamed as `delta.tool_calls` chunks (the name first, then the arguments as
//! they are generated). One call per reply (parallel calls are not generated).

use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Function,
}

#[derive(Debug, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// How a request may use its tools.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// A call or text.
    Auto,
    /// A call of any of the tools.
    Required,
    /// A call of this tool.
    Named(String),
}

/// What the tools make of a chat request: text for the system message and the grammar of the
/// reply.
#[derive(Debug)]
pub struct Plan {
    pub system: String,
    pub grammar: String,
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// The schema of a call of `f`: `{"name": <its name>, "arguments": <its parameters>}`.
fn call_schema(f: &Function) -> Value {
    let params = f
        .parameters
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    json!({
        "type": "object",
        "properties": {"name": {"const": f.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

/// Checks the tools and the choice; `None` when the tools do not take part (no tools, or
/// `tool_choice: "none"`).
pub fn plan(
    tools: Option<&[Tool]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Plan>, ApiError> {
    let tools = tools.unwrap_or_default();
    let mode = match choice {
        None if tools.is_empty() => return Ok(None),
        None => Mode::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Mode::Auto,
            "required" => Mode::Required,
            other => {
                return Err(bad(
                    format!(
                        "tool_choice {}: one of none, auto, required, or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                        rrt_service::validate::quote(other)
                    ),
                    "tool_choice",
                ))
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                Mode::Named(name.to_string())
            }
            _ => {
                return Err(bad(
                    "tool_choice: a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    "tool_choice",
                ))
            }
        },
    };
    if tools.is_empty() {
        return Err(bad("tool_choice needs tools", "tool_choice"));
    }
    let _ = parallel; // One call per reply satisfies either setting.
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(
                format!(
                    "tools[{i}].type {}: only function tools",
                    rrt_service::validate::quote(&t.kind)
                ),
                "tools",
            ));
        }
        let n = &t.function.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(
                format!(
                    "tools[{i}].function.name {}: 1-64 of a-z, A-Z, 0-9, _ and -",
                    rrt_service::validate::quote(n)
                ),
                "tools",
            ));
        }
        if tools[..i].iter().any(|u| &u.function.name == n) {
            return Err(bad(format!("tools: {n} is named twice"), "tools"));
        }
        if let Some(p) = &t.function.parameters {
            if !p.is_object() {
                return Err(bad(
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                    "tools",
                ));
            }
        }
    }
    let callable: Vec<&Tool> = match &mode {
        Mode::Named(name) => {
            let t = tools
                .iter()
                .find(|t| &t.function.name == name)
                .ok_or_else(|| {
                    bad(
                        format!("tool_choice names {name}, which is not in tools"),
                        "tool_choice",
                    )
                })?;
            vec![t]
        }
        _ => tools.iter().collect(),
    };
    let schemas: Vec<Value> = callable.iter().map(|t| call_schema(&t.function)).collect();
    let mut schema = if schemas.len() == 1 {
        schemas[0].clone()
    } else {
        json!({"anyOf": schemas})
    };
    // Compact JSON, name first: what the stream parser reads the name from.
    schema["x-guidance"] =
        json!({"item_separator": ",", "key_separator": ":", "whitespace_flexible": false});
    let call = format!("start_call: \"{OPEN}\" call_body \"{CLOSE}\"\ncall_body: %json {schema}\n");
    let grammar = match mode {
        Mode::Auto => format!("start: start_call | TEXT\nTEXT: /[^<][\\s\\S]*/\n{call}"),
        _ => format!("start: start_call\n{call}"),
    };
    let listed: Vec<String> = tools
        .iter()
        .map(|t| {
            json!({
                "name": t.function.name,
                "description": t.function.description.clone().unwrap_or_default(),
                "parameters": t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
            .to_string()
        })
        .collect();
    let how = match &mode {
        Mode::Auto => "To call a function, reply with only".to_string(),
        Mode::Required => "Call one of them now: reply with only".to_string(),
        Mode::Named(n) => format!("Call {n} now: reply with only"),
    };
    let system = format!(
        "You can call these functions (JSON schemas of their arguments):\n<tools>\n{}\n</tools>\n{how} {OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CLOSE}",
        listed.join("\n")
    );
    Ok(Some(Plan { system, grammar }))
}

/// A tool message's content as the model reads it.
pub fn render_response(content: &str) -> String {
    format!("<tool_response>{content}</tool_response>")
}

/// An assistant message's earlier `tool_calls` as the model wrote them.
pub fn render_calls(calls: &[Value]) -> String {
    calls
        .iter()
        .map(|c| {
            let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
            // OpenAI sends arguments as a JSON string; the model wrote an object.
            let args = match c.pointer("/function/arguments") {
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                }
                Some(v) => v.clone(),
                None => json!({}),
            };
            format!("{OPEN}{{\"name\":{name},\"arguments\":{args}}}{CLOSE}")
        })
        .collect()
}

/// A new call id, as OpenAI's (`call_` and 24 characters).
pub fn call_id() -> String {
    let mut rng = rand::rng();
    let mut id = String::from("call_");
    for _ in 0..24 {
        id.push(char::from_digit(rng.random_range(0..36), 36).unwrap_or('0'));
    }
    id
}

/// A whole reply: `Some((name, arguments as a JSON string))` when it is a call.
pub fn parse_call(text: &str) -> Option<(String, String)> {
    let body = text.strip_prefix(OPEN)?.strip_suffix(CLOSE)?;
    let v: Value = serde_json::from_str(body).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments")?.to_string();
    Some((name, args))
}

/// What a piece of a streamed reply turns into.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// The call's name is known: its first `delta.tool_calls` chunk.
    CallStart {
        id: String,
        name: String,
    },
    Arguments(String),
}

/// Reads a streamed reply as it comes: text, or a call (its name as soon as it is complete,
/// then its arguments, holding back what may be the closing `}</tool_call>`).
#[derive(Debug, Default)]
pub struct StreamParser {
    buf: String,
    state: State,
}

#[derive(Debug, Default, PartialEq)]
enum State {
    #[default]
    Undecided,
    Text,
    /// Waiting for `<tool_call>{"name":"...","arguments":`.
    CallHead,
    /// Streaming the arguments; `sent` bytes of `buf` (after the head) are out.
    Arguments {
        from: usize,
        sent: usize,
    },
}

const HEAD: &str = "{\"name\":\"";
const ARGS: &str = "\",\"arguments\":";
const TAIL: &str = "}</tool_call>";

impl StreamParser {
    pub fn is_call(&self) -> bool {
        matches!(self.state, State::CallHead | State::Arguments { .. })
    }

    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Undecided => match self.buf.chars().next() {
                    None => return out,
                    Some('<') => self.state = State::CallHead,
                    Some(_) => self.state = State::Text,
                },
                State::Text => {
                    if !self.buf.is_empty() {
                        out.push(Piece::Text(std::mem::take(&mut self.buf)));
                    }
                    return out;
                }
                State::CallHead => {
                    let Some(rest) = self
                        .buf
                        .strip_prefix(OPEN)
                        .and_then(|r| r.strip_prefix(HEAD))
                    else {
                        return out;
                    };
                    // The name ends at the first `","arguments":` (names have no quotes).
                    let Some(end) = rest.find(ARGS) else {
                        return out;
                    };
                    let name = rest[..end].to_string();
                    let from = OPEN.len() + HEAD.len() + end + ARGS.len();
                    out.push(Piece::CallStart {
                        id: call_id(),
                        name,
                    });
                    self.state = State::Arguments { from, sent: from };
                }
                State::Arguments { from, sent } => {
                    // Everything but what may be the closing tail.
                    let safe = self.buf.len().saturating_sub(TAIL.len()).max(sent);
                    let mut cut = safe;
                    while !self.buf.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    if cut > sent {
                        out.push(Piece::Arguments(self.buf[sent..cut].to_string()));
                        self.state = State::Arguments { from, sent: cut };
                    }
                    return out;
                }
            }
        }
    }

    /// The rest when the reply ends: the arguments up to the closing tail.
    pub fn finish(&mut self) -> Vec<Piece> {
        match self.state {
            State::Arguments { sent, .. } => {
                let end = self.buf.strip_suffix(TAIL).map_or(self.buf.len(), str::len);
                if end > sent {
                    vec![Piece::Arguments(self.buf[sent..end].to_string())]
                } else {
                    Vec::new()
                }
            }
            State::Text | State::Undecided if !self.buf.is_empty() => {
                vec![Piece::Text(std::mem::take(&mut self.buf))]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        serde_json::from_value(json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
             "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
        ]))
        .unwrap()
    }

    #[test]
    fn choices_become_grammars_and_bad_ones_are_refused() {
        let t = tools();
        assert!(plan(None, None, None).unwrap().is_none());
        assert!(plan(Some(&t), Some(&json!("none")), None)
            .unwrap()
            .is_none());
        let auto = plan(Some(&t), None, None).unwrap().unwrap();
        assert!(auto.grammar.contains("TEXT") && auto.grammar.contains("anyOf"));
        assert!(auto.system.contains("get_weather") && auto.system.contains("add"));
        let named = plan(
            Some(&t),
            Some(&json!({"type": "function", "function": {"name": "add"}})),
            Some(true),
        )
        .unwrap()
        .unwrap();
        assert!(named.system.contains("Call add now"));
        assert!(!named.grammar.contains("get_weather") && !named.grammar.contains("TEXT"));
        for (choice, param) in [
            (json!("sometimes"), "tool_choice"),
            (
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (json!({"function": {"name": "add"}}), "tool_choice"),
        ] {
            let e = plan(Some(&t), Some(&choice), None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{choice}");
        }
        assert!(plan(None, Some(&json!("required")), None).is_err());
        let dup: Vec<Tool> = serde_json::from_value(json!([
            {"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f"}}
        ]))
        .unwrap();
        assert_eq!(
            plan(Some(&dup), None, None).unwrap_err().param.as_deref(),
            Some("tools")
        );
    }

    #[test]
    fn replies_parse_whole_and_streamed() {
        let reply = r#"<tool_call>{"name":"add","arguments":{"a":2,"b":40}}</tool_call>"#;
        assert_eq!(
            parse_call(reply),
            Some(("add".into(), r#"{"a":2,"b":40}"#.into()))
        );
        assert_eq!(parse_call("just text"), None);
        // Streamed in uneven pieces: the name once, then the arguments in order, no tail.
        for step in [1, 3, 7] {
            let mut p = StreamParser::default();
            let mut pieces = Vec::new();
            let chars: Vec<char> = reply.chars().collect();
            for c in chars.chunks(step) {
                pieces.extend(p.push(&c.iter().collect::<String>()));
            }
            pieces.extend(p.finish());
            assert!(matches!(&pieces[0], Piece::CallStart { name, .. } if name == "add"));
            let args: String = pieces[1..]
                .iter()
                .map(|p| match p {
                    Piece::Arguments(a) => a.clone(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(args, r#"{"a":2,"b":40}"#, "step {step}");
        }
        let mut p = StreamParser::default();
        let mut text = p.push("Hello");
        text.extend(p.push(" there"));
        text.extend(p.finish());
        assert_eq!(
            text,
            vec![Piece::Text("Hello".into()), Piece::Text(" there".into())]
        );
        assert_eq!(
            render_calls(&[json!({"function": {"name": "add", "arguments": "{\"a\":1}"}})]),
            r#"<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>"#
        );
    }
}
