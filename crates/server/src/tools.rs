//! Tool calling: the functions of a chat request are described to the model in a system
//! message, a call is written `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, and the
//! reply is generated under a grammar whose calls name only the request's functions with
//! arguments that follow their JSON schemas. RWKV's G1 models publish no tool-call format;
//! this one is the `<tool_call>` convention of the open chat models, in the RWKV chat format.

use serde_json::{json, Value};

/// One function a request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name (`[A-Za-z0-9_-]{1,64}`).
    pub name: String,
    /// What it does.
    pub description: String,
    /// The JSON schema of its arguments.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ToolChoice {
    /// The model answers in text.
    None,
    /// The model answers in text or calls functions.
    #[default]
    Auto,
    /// The model calls one or more functions.
    Required,
    /// The model calls this function.
    Named(String),
}

/// A call the model made (or an earlier assistant turn holds): the function and its
/// arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The function.
    pub name: String,
    /// Its arguments, JSON text.
    pub arguments: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The system message that describes the functions and how to call them.
pub fn system_text(tools: &[Tool]) -> String {
    let list: Vec<String> = tools
        .iter()
        .map(|t| {
            json!({"name": t.name, "description": t.description, "parameters": t.parameters})
                .to_string()
        })
        .collect();
    format!(
        "System: You can call these functions:\n{}\nTo call one, reply with \
         {OPEN}{{\"name\": NAME, \"arguments\": ARGUMENTS}}{CLOSE}.\n\n",
        list.join("\n")
    )
}

/// How an assistant turn's calls are written in the conversation.
pub fn render_calls(calls: &[Call]) -> String {
    calls
        .iter()
        .map(|c| {
            format!(
                "{OPEN}{{\"name\": {}, \"arguments\": {}}}{CLOSE}",
                json!(c.name),
                c.arguments
            )
        })
        .collect()
}

/// Most calls in one reply (with `parallel_tool_calls`, the default).
pub const MAX_CALLS: usize = 8;

/// The Lark grammar of a reply under `choice` (`None` for [`ToolChoice::None`]): one call of
/// the offered functions (only the named one), or up to [`MAX_CALLS`] with `parallel`, each's
/// arguments following its schema, or (with `auto`) text that does not start with a call.
pub fn grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<String> {
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    let calls: Vec<Value> = offered
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        })
        .collect();
    let schema = crate::grammar::compact(json!({"anyOf": calls}));
    let call = format!("call: {:?} %json {schema} {:?}", OPEN, CLOSE);
    let calls = if parallel {
        format!("call{{1,{MAX_CALLS}}}")
    } else {
        "call".to_string()
    };
    Some(match choice {
        ToolChoice::Auto => format!("start: {calls} | TEXT\n{call}\nTEXT: /[^<](.|\\n)*/"),
        _ => format!("start: {calls}\n{call}"),
    })
}

/// The calls in a reply written under [`grammar`], or `None` when it holds text (or a call cut
/// short by the token limit).
pub fn parse_calls(reply: &str) -> Option<Vec<Call>> {
    let mut rest = reply.trim();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        rest = rest.strip_prefix(OPEN)?;
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = stream.next()?.ok()?;
        rest = rest[stream.byte_offset()..]
            .trim_start()
            .strip_prefix(CLOSE)?
            .trim_start();
        calls.push(Call {
            name: v.get("name")?.as_str()?.to_string(),
            arguments: v.get("arguments")?.to_string(),
        });
    }
    (!calls.is_empty()).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip() {
        let calls = vec![
            Call {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            Call {
                name: "now".into(),
                arguments: "{}".into(),
            },
        ];
        assert_eq!(parse_calls(&render_calls(&calls)), Some(calls));
        assert_eq!(parse_calls("Hello"), None);
        assert_eq!(parse_calls("<tool_call>{\"name\": \"x\", \"argu"), None);
    }
}
