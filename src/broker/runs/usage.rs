//! What an LLM provider says a response cost: the `usage` fields of OpenAI's and Anthropic's
//! answers, read from the response as it streams past (never stored, never logged: only the
//! model's name and the token counts are kept).
//!
//! What runs here: on the executor thread, inside the proxy's response body (`UpstreamBody`'s
//! tap), only for requests of a run. A JSON answer is kept up to [`MAX_JSON`] bytes and read at
//! its end; an event stream is read line by line (`data:` lines up to [`MAX_LINE`]). Counts are
//! the largest seen per response, because Anthropic's stream repeats a running total.

use serde_json::Value;

/// Largest JSON answer read for its usage (a larger one counts as a request without tokens).
pub const MAX_JSON: usize = 4 << 20;
/// Longest event-stream line read for usage.
pub const MAX_LINE: usize = 1 << 20;

/// One response's reading.
#[derive(Debug, Default)]
pub struct Meter {
    sse: bool,
    buf: Vec<u8>,
    /// The current line (or the whole answer) went past its cap: skip to its end.
    skipping: bool,
    /// The model the provider named.
    pub model: Option<String>,
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
}

impl Meter {
    /// A meter for an event stream (`sse`) or a JSON answer.
    pub fn new(sse: bool) -> Meter {
        Meter { sse, ..Meter::default() }
    }

    /// Reads the next piece of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.skipping || self.buf.len() + chunk.len() > MAX_JSON {
                self.skipping = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(i);
            rest = &after[1..];
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.buf.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.buf);
                whole.extend_from_slice(line);
                self.line(&whole);
            }
        }
        if self.skipping {
            return;
        }
        if self.buf.len() + rest.len() > MAX_LINE {
            self.buf.clear();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(rest);
        }
    }

    /// The body ended: a JSON answer is read now.
    pub fn finish(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if self.sse {
            if !self.skipping {
                self.line(&buf);
            }
        } else if !self.skipping
            && let Ok(v) = serde_json::from_slice::<Value>(&buf)
        {
            self.observe(&v);
        }
    }

    /// Total tokens.
    pub fn tokens(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.first() != Some(&b'{') {
            return; // `[DONE]`
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            self.observe(&v);
        }
    }

    fn observe(&mut self, v: &Value) {
        // Top level (OpenAI chat, Anthropic messages, stream deltas), `message` (Anthropic's
        // `message_start`), `response` (OpenAI's Responses API events).
        for at in [v, &v["message"], &v["response"]] {
            if self.model.is_none()
                && let Some(m) = at["model"].as_str()
            {
                self.model = Some(m.chars().take(100).collect());
            }
            let u = &at["usage"];
            if !u.is_object() {
                continue;
            }
            let n = |k: &str| u[k].as_u64().unwrap_or(0);
            self.input = self.input.max(n("prompt_tokens").max(n("input_tokens")));
            self.output = self.output.max(n("completion_tokens").max(n("output_tokens")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_json_and_anthropic_stream_are_counted_in_any_chunking() {
        let body = br#"{"id":"x","model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        for cut in [1, 7, body.len()] {
            let mut m = Meter::new(false);
            for c in body.chunks(cut) {
                m.push(c);
            }
            m.finish();
            assert_eq!((m.model.as_deref(), m.input, m.output), (Some("gpt-4.1"), 12, 5), "cut {cut}");
        }
        let stream = concat!(
            "event: message_start\r\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\r\n\r\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
            "data: [DONE]\n\n"
        );
        for cut in [1, 5, 64, stream.len()] {
            let mut m = Meter::new(true);
            for c in stream.as_bytes().chunks(cut) {
                m.push(c);
            }
            m.finish();
            assert_eq!((m.model.as_deref(), m.input, m.output), (Some("claude-x"), 30, 9), "cut {cut}");
        }
    }

    #[test]
    fn oversized_lines_and_bodies_are_skipped_not_kept() {
        let mut m = Meter::new(true);
        m.push(b"data: {\"usage\":{\"input_tokens\":");
        m.push(&vec![b'1'; MAX_LINE + 10]);
        assert!(m.buf.is_empty() && m.skipping, "a line past the cap is not buffered");
        m.push(b"}}\ndata: {\"usage\":{\"output_tokens\":4}}\n");
        m.finish();
        assert_eq!((m.input, m.output), (0, 4));
        let mut j = Meter::new(false);
        j.push(&vec![b' '; MAX_JSON]);
        j.push(br#"{"usage":{"prompt_tokens":3}}"#);
        j.finish();
        assert_eq!(j.tokens(), 0, "an answer past MAX_JSON is not read");
        let mut bad = Meter::new(false);
        bad.push(br#"{"usage":{"prompt_tokens":-4,"completion_tokens":"9"}}"#);
        bad.finish();
        assert_eq!(bad.tokens(), 0, "negative or text counts are not counted");
    }
}
