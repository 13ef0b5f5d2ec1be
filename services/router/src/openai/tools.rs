//! Tool calling for `/v1/chat/completions`: `tools`, `tool_choice` (`none`, `auto`,
//! `required`, a named function), `parallel_tool_calls` and the history of earlier calls, on
//! models whose chat template has no tool syntax of its own (SmolLM2's ChatML has none). The
//! tools are described to the model in the system message; a call is written
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen format), several
//! calls one per line, and the reply is decoded under a Lark grammar (llguidance, on the worker)
//! that embeds each function's parameter schema, so every call parses and its arguments
//! validate: `required` and a named function allow only calls, `auto` calls or text (not
//! starting with `<`); `parallel_tool_calls: true` allows up to [`MAX_CALLS`] calls, else (and
//! for a named function) one: OpenAI's default allows several, but small models given the
//! choice repeat one call until the token limit. The reply is parsed back into `tool_calls` with `finish_reason: "tool_calls"`,
//! streamed as `delta.tool_calls` chunks (each call's index, id and name first, then its
//! arguments as they are generated).

use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;

pub const OPEN: &str = "<tool_call>";
/// Calls one reply may hold with `parallel_tool_calls: true` (so a model that repeats itself
/// ends with whole calls, not at the token limit mid-call).
pub const MAX_CALLS: usize = 8;
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
    // Several calls only when asked for (`parallel_tool_calls: true`): OpenAI's default allows
    // them, but small models given the choice repeat the same call until the token limit. A
    // named function is called once.
    let parallel = parallel == Some(true) && !matches!(mode, Mode::Named(_));
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
    let calls = if parallel {
        format!(
            "calls: start_call (\"\\n\" start_call){{0,{}}}\n",
            MAX_CALLS - 1
        )
    } else {
        "calls: start_call\n".to_string()
    };
    let call =
        format!("{calls}start_call: \"{OPEN}\" call_body \"{CLOSE}\"\ncall_body: %json {schema}\n");
    let grammar = match mode {
        Mode::Auto => format!("start: calls | TEXT\nTEXT: /[^<][\\s\\S]*/\n{call}"),
        _ => format!("start: calls\n{call}"),
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
    let several = if parallel {
        "\nTo call several functions at once, write one such line per call."
    } else {
        ""
    };
    let system = format!(
        "You can call these functions (JSON schemas of their arguments):\n<tools>\n{}\n</tools>\n{how} {OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CLOSE}{several}",
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
        .collect::<Vec<_>>()
        .join("\n")
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

/// A whole reply: `Some(calls)` (each its name and arguments as a JSON string) when it is one
/// or more calls, one per line.
pub fn parse_calls(text: &str) -> Option<Vec<(String, String)>> {
    let mut rest = text;
    let mut calls = Vec::new();
    loop {
        let body = rest.strip_prefix(OPEN)?;
        let mut values = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        let v = values.next()?.ok()?;
        rest = body[values.byte_offset()..].strip_prefix(CLOSE)?;
        let name = v.get("name")?.as_str()?.to_string();
        let args = v.get("arguments")?.to_string();
        calls.push((name, args));
        rest = rest.trim_start();
        if rest.is_empty() {
            return Some(calls);
        }
    }
}

/// What a piece of a streamed reply turns into.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// Call `index`'s name is known: its first `delta.tool_calls` chunk.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments.
    Arguments {
        index: usize,
        text: String,
    },
}

/// Reads a streamed reply as it comes: text, or calls (each call's name as soon as it is
/// complete, then its arguments as they come: a JSON scan finds where they end, so nothing
/// after them is taken for arguments).
#[derive(Debug, Default)]
pub struct StreamParser {
    buf: String,
    state: State,
    /// Calls started so far.
    calls: usize,
}

#[derive(Debug, Default, PartialEq)]
enum State {
    #[default]
    Undecided,
    Text,
    /// Waiting for `<tool_call>{"name":"...","arguments":` (after any whitespace).
    CallHead,
    /// Streaming the arguments object from `buf[0]`: `scan` bytes read, `sent` bytes out.
    Arguments {
        scan: JsonScan,
        sent: usize,
    },
    /// The arguments are out; waiting for `}</tool_call>`.
    CallTail,
}

/// Where a JSON value being read stands: nesting depth and whether inside a string.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct JsonScan {
    at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Reads `text` from `self.at`; `Some(end)` once the value (an object) is complete.
    fn read(&mut self, text: &str) -> Option<usize> {
        let bytes = text.as_bytes();
        while self.at < bytes.len() {
            let b = bytes[self.at];
            self.at += 1;
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(self.at);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

const HEAD: &str = "{\"name\":\"";
const ARGS: &str = "\",\"arguments\":";
const TAIL: &str = "}</tool_call>";

impl StreamParser {
    /// Whether the reply is calls (known from its first character).
    pub fn is_call(&self) -> bool {
        self.calls > 0 || self.state == State::CallHead
    }

    /// Whether the reply so far is one or more whole calls and nothing more.
    pub fn whole_calls(&self) -> bool {
        self.calls > 0 && self.state == State::CallHead && self.buf.trim().is_empty()
    }

    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match &mut self.state {
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
                        .trim_start()
                        .strip_prefix(OPEN)
                        .and_then(|r| r.strip_prefix(HEAD))
                    else {
                        return out;
                    };
                    // The name ends at the first `","arguments":` (names have no quotes).
                    let Some(end) = rest.find(ARGS) else {
                        return out;
                    };
                    out.push(Piece::CallStart {
                        index: self.calls,
                        id: call_id(),
                        name: rest[..end].to_string(),
                    });
                    self.buf = rest[end + ARGS.len()..].to_string();
                    self.state = State::Arguments {
                        scan: JsonScan::default(),
                        sent: 0,
                    };
                }
                State::Arguments { scan, sent } => {
                    let index = self.calls;
                    let end = scan.read(&self.buf);
                    let mut cut = end.unwrap_or(self.buf.len());
                    while !self.buf.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    if cut > *sent {
                        out.push(Piece::Arguments {
                            index,
                            text: self.buf[*sent..cut].to_string(),
                        });
                        *sent = cut;
                    }
                    let Some(end) = end else { return out };
                    self.buf.drain(..end);
                    self.calls += 1;
                    self.state = State::CallTail;
                }
                State::CallTail => {
                    let Some(rest) = self.buf.strip_prefix(TAIL) else {
                        return out;
                    };
                    self.buf = rest.to_string();
                    self.state = State::CallHead;
                }
            }
        }
    }

    /// The rest when the reply ends: text held back (a call's pieces are all out already).
    pub fn finish(&mut self) -> Vec<Piece> {
        match self.state {
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
    fn parallel_calls_follow_the_setting() {
        let t = tools();
        let two = plan(Some(&t), Some(&json!("required")), Some(true))
            .unwrap()
            .unwrap();
        assert!(two.grammar.contains("start_call (\"\\n\" start_call){0,7}"));
        assert!(two.system.contains("several"));
        for parallel in [None, Some(false)] {
            let one = plan(Some(&t), Some(&json!("required")), parallel)
                .unwrap()
                .unwrap();
            assert!(one.grammar.contains("calls: start_call\n"));
            assert!(!one.system.contains("several"));
        }
        let named = json!({"type": "function", "function": {"name": "add"}});
        let named = plan(Some(&t), Some(&named), Some(true)).unwrap().unwrap();
        assert!(named.grammar.contains("calls: start_call\n"));
    }

    /// Streams `reply` in pieces of `step` characters and puts the calls back together.
    fn streamed(reply: &str, step: usize) -> (Vec<(usize, String)>, Vec<String>, String) {
        let mut p = StreamParser::default();
        let mut pieces = Vec::new();
        let chars: Vec<char> = reply.chars().collect();
        for c in chars.chunks(step) {
            pieces.extend(p.push(&c.iter().collect::<String>()));
        }
        pieces.extend(p.finish());
        let (mut names, mut args, mut text) = (Vec::new(), Vec::<String>::new(), String::new());
        for piece in pieces {
            match piece {
                Piece::CallStart { index, name, .. } => {
                    assert_eq!(index, names.len());
                    names.push((index, name));
                    args.push(String::new());
                }
                Piece::Arguments { index, text } => {
                    assert_eq!(index + 1, names.len(), "arguments of the open call");
                    args[index].push_str(&text);
                }
                Piece::Text(t) => text.push_str(&t),
            }
        }
        (names, args, text)
    }

    #[test]
    fn replies_parse_whole_and_streamed() {
        let reply = r#"<tool_call>{"name":"add","arguments":{"a":2,"b":40}}</tool_call>"#;
        assert_eq!(
            parse_calls(reply),
            Some(vec![("add".into(), r#"{"a":2,"b":40}"#.into())])
        );
        assert_eq!(parse_calls("just text"), None);
        assert_eq!(parse_calls(&format!("{reply} and text")), None);
        // Strings holding braces, quotes and the closing tag do not end the arguments early.
        let tricky = r#"<tool_call>{"name":"get_weather","arguments":{"city":"}</tool_call> \"{x","n":[1,{"y":2}]}}</tool_call>"#;
        let two = format!("{reply}\n{tricky}");
        let want = vec![
            ("add".to_string(), r#"{"a":2,"b":40}"#.to_string()),
            (
                "get_weather".to_string(),
                r#"{"city":"}</tool_call> \"{x","n":[1,{"y":2}]}"#.to_string(),
            ),
        ];
        assert_eq!(parse_calls(&two), Some(want.clone()));
        // Streamed in uneven pieces: each name once, then its arguments in order, no tail.
        for step in [1, 3, 7, 200] {
            let (names, args, text) = streamed(reply, step);
            assert_eq!(names, vec![(0, "add".to_string())], "step {step}");
            assert_eq!(args, vec![r#"{"a":2,"b":40}"#.to_string()], "step {step}");
            assert!(text.is_empty());
            let (names, args, text) = streamed(&two, step);
            let got: Vec<(String, String)> = names.into_iter().map(|(_, n)| n).zip(args).collect();
            assert_eq!(got, want, "step {step}");
            assert!(text.is_empty());
        }
        // Whole calls, or one cut short (a reply ended at the token limit).
        let mut p = StreamParser::default();
        p.push(reply);
        assert!(p.is_call() && p.whole_calls());
        let mut p = StreamParser::default();
        p.push(&reply[..reply.len() - 4]);
        assert!(p.is_call() && !p.whole_calls());
        let mut p = StreamParser::default();
        let mut text = p.push("Hello");
        text.extend(p.push(" there"));
        text.extend(p.finish());
        assert!(!p.is_call());
        assert_eq!(
            text,
            vec![Piece::Text("Hello".into()), Piece::Text(" there".into())]
        );
        assert_eq!(
            render_calls(&[
                json!({"function": {"name": "add", "arguments": "{\"a\":1}"}}),
                json!({"function": {"name": "add", "arguments": "{\"a\":2}"}})
            ]),
            "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>\n<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":2}}</tool_call>"
        );
    }
}
