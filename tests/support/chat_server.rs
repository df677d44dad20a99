//! A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the `llm` pruning proxy's
//! tests (issue 4): answers scripted responses in order, then a fallback (500 unless set),
//! recording each request with the time it arrived. Shared by `stages/tests/prune_llm.rs` and
//! the end-to-end tests through `#[path]` modules, so some helpers go unused in one of them.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Status, extra headers and body.
    Http(u16, Vec<(String, String)>, String),
    /// Read the request, then hold the connection this long without answering.
    Stall(Duration),
}

impl Answer {
    /// `code` with `body` and no extra header.
    pub fn status(code: u16, body: impl Into<String>) -> Answer {
        Answer::Http(code, Vec::new(), body.into())
    }

    /// 200 with a chat completion whose message is `content`.
    pub fn chat(content: &str) -> Answer {
        Answer::status(200, chat(content))
    }

    /// The same answer with one more header.
    pub fn header(self, name: &str, value: &str) -> Answer {
        match self {
            Answer::Http(code, mut h, body) => {
                h.push((name.to_string(), value.to_string()));
                Answer::Http(code, h, body)
            }
            stall => stall,
        }
    }
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Request line and headers.
    pub head: String,
    /// The body.
    pub body: String,
    /// When the whole request had arrived.
    pub at: Instant,
}

/// The server; it stops when dropped or after ten minutes.
pub struct Server {
    /// Base URL (`http://127.0.0.1:<port>/v1`), the proxy's `endpoint`.
    pub url: String,
    script: Arc<Mutex<VecDeque<Answer>>>,
    fallback: Arc<Mutex<Answer>>,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Starts a server with an empty script.
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let fallback =
            Arc::new(Mutex::new(Answer::status(500, r#"{"error":"unscripted request"}"#)));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, l, st) = (script.clone(), fallback.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &s, &f, &l),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server { url, script, fallback, log, stop }
    }

    /// Appends an answer to the script.
    pub fn push(&self, a: Answer) {
        self.script.lock().unwrap().push_back(a);
    }

    /// The answer once the script is out.
    pub fn set_fallback(&self, a: Answer) {
        *self.fallback.lock().unwrap() = a;
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut stream: TcpStream,
    script: &Mutex<VecDeque<Answer>>,
    fallback: &Mutex<Answer>,
    log: &Mutex<Vec<Request>>,
) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    log.lock().unwrap().push(Request { head, body, at: Instant::now() });
    let next = script.lock().unwrap().pop_front();
    let answer = next.unwrap_or_else(|| fallback.lock().unwrap().clone());
    match answer {
        Answer::Stall(d) => std::thread::sleep(d),
        Answer::Http(code, headers, body) => {
            let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let reply = format!(
                "HTTP/1.1 {code} Scripted\r\nContent-Type: application/json\r\nContent-Length: \
                 {}\r\n{extra}Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    }
}

/// A chat-completions response body whose message is `content`.
pub fn chat(content: &str) -> String {
    serde_json::json!({
        "id": "x",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content } }]
    })
    .to_string()
}
