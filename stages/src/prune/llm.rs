//! The `llm` proxy: the paper's memory-bank loop (eq. 16-17) with candidate plans proposed by an
//! OpenAI-compatible chat-completions endpoint.
//!
//! Each round builds a prompt in the GENIUS pattern: a system line stating the expert role; the
//! architecture's prunable units (name, kind, current width, allowed widths, the share of MACs
//! pruning the unit to its minimum saves); the group (timestep range, SNR range, MACs budget as a
//! ratio and in MACs); the memory bank ("here are some experimental results you can use as a
//! reference: <plan> gives loss <x>", rebuilt each round); and the strict answer format, JSON
//! only: `{"plans": [{"<unit>": <width>, ...}, ...]}` with exactly `candidates` plans. The request
//! is `POST {endpoint}/chat/completions` with `model`, `temperature` and the two messages.
//!
//! **Answers.** Code fences around the JSON are stripped. An answer that is not that JSON is
//! asked for again (same request), as are timeouts, transport errors, 429 and 5xx (exponential
//! backoff from `backoff_ms`), up to `max_retries` retries in all; then the stage fails with the
//! last reason. A 429 or 5xx carrying `Retry-After` (delay-seconds, or an IMF-fixdate HTTP-date)
//! waits the longer of that and the backoff, at most [`MAX_RETRY_WAIT`]: the server's hint is
//! honoured but never shortens the backoff, and a server asking for hours gets a retry after a
//! minute (and, if it still refuses, the stage fails once the retries are spent). Other HTTP errors fail at once with the status and the body. Widths are rounded,
//! then every plan goes through [`fit`] (granularity, `[min, full]`, the bound), so a plan over
//! budget or out of range is repaired, never exceeds the bound. Unknown unit names are ignored;
//! units left out keep their full width. Extra plans are dropped; **fewer plans than asked are
//! filled with mutations** (as in [`super::search`]) of the best plans in the bank, or of the
//! importance-greedy plan while the bank is empty.
//!
//! **Caches.** The bank is saved per round in the same side store as `search`'s, keyed by
//! everything except `rounds` and the transport settings (`api_key_env`, `timeout_s`,
//! `max_retries`, `backoff_ms`): raising `rounds` sends requests for the new rounds only. Every
//! usable response body is also stored under `<bank dir>/responses/<blake3 of the request
//! JSON>.json`, so a re-run that builds the same requests (same bank, same prompt) makes no HTTP
//! call. The API key travels only in the `Authorization` header: it is never part of a request
//! body, a digest, a file, a log line or an error: every response body, error or not, has the
//! key [redacted](redact) (as it is and JSON-escaped) before it is read, logged or stored, so a
//! server echoing the header back leaves no trace of it in the cache.
//!
//! **TLS.** `https` endpoints go through rustls with the `ring` crypto provider, installed as the
//! process default before the client is built ([`http_client`]); certificates are checked against
//! the platform's roots. (reqwest's `rustls` feature would bring the `aws-lc-rs` provider, whose
//! C build costs minutes in CI.)

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::cost::cost;

use super::budget::{ScorePriority, ShapePriority, fit, macs_of};
use super::params::LlmParams;
use super::search::{
    Bank, SearchEnv, bank_dir, channel_scores, finish, measure_round, mutate, start_bank,
    write_atomic,
};
use super::stage::sub_seed;
use super::structure::{Plan, Scores, Structure, UnitKind};

/// Units changed per mutation when filling missing plans.
const FILL_MUTATIONS: usize = 4;
/// Parents (best bank plans) filling mutations start from.
const FILL_PARENTS: usize = 2;
/// Longest wait before a retry, whatever the backoff or `Retry-After` say.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Runs (or resumes) the LLM-proposed search; writes the final bank to `bank_out` and returns
/// the best plan with the channel scores used to apply it.
pub fn run(env: &SearchEnv<'_>, p: &LlmParams, bank_out: &Path) -> anyhow::Result<(Plan, Scores)> {
    let s = env.structure;
    let (scores, scores_from) = channel_scores(env, p.importance)?;
    let key = LlmParams {
        rounds: 0,
        api_key_env: String::new(),
        timeout_s: 0,
        max_retries: 0,
        backoff_ms: 0,
        ..p.clone()
    };
    let dir = bank_dir(env, &format!("llm/{}", serde_json::to_string(&key)?), scores_from)?;
    super::search::claim_bank_dir(&dir, env.ctx)?;
    let responses = dir.join("responses");
    std::fs::create_dir_all(&responses)
        .with_context(|| format!("creating `{}`", responses.display()))?;
    let mut bank = start_bank(env, &scores, &dir, p.rounds)?;
    let greedy = fit(s, &s.full_plan(), env.bound, &ScorePriority::new(s, &scores))?;
    let architecture = describe(env);
    let mut conn = Connection::new(p);
    while bank.rounds < p.rounds {
        env.ctx.cancel.check()?;
        let round = bank.rounds + 1;
        let request = request_body(p, &user_prompt(&architecture, &bank, p.candidates));
        let answered = propose(&mut conn, p, &responses, &request, s)?;
        let mut proposed = Vec::with_capacity(p.candidates);
        for plan in answered.iter().take(p.candidates) {
            proposed.push(fit(s, plan, env.bound, &ShapePriority)?);
        }
        if proposed.len() < p.candidates {
            tracing::warn!(
                stage = %env.ctx.id,
                round,
                answered = proposed.len(),
                asked = p.candidates,
                "fewer plans than asked: filling with mutations of the best plans"
            );
            let mut rng = ChaCha8Rng::seed_from_u64(sub_seed(
                env.rng_seed,
                env.group.index,
                200 + round as u64,
            ));
            let parents: Vec<Plan> = if bank.entries.is_empty() {
                vec![greedy.clone()]
            } else {
                bank.ranked().iter().take(FILL_PARENTS).map(|e| e.plan.clone()).collect()
            };
            let mut j = 0;
            while proposed.len() < p.candidates {
                let parent = &parents[j % parents.len()];
                proposed.push(fit(
                    s,
                    &mutate(s, parent, FILL_MUTATIONS, &mut rng),
                    env.bound,
                    &ShapePriority,
                )?);
                j += 1;
            }
        }
        measure_round(env, &scores, &mut bank, round, proposed)?;
        write_atomic(&dir.join(format!("round-{round}.json")), &serde_json::to_vec(&bank)?)?;
    }
    Ok((finish(&bank, env.group.index, bank_out)?, scores))
}

/// The system message.
pub const SYSTEM_PROMPT: &str = "You are an expert in neural network pruning and in the \
architecture of diffusion models. You decide how many channels and attention heads each part of \
a UNet noise predictor keeps so that the pruned model loses as little denoising quality as \
possible within a compute budget.";

/// The fixed part of the user message: units and group.
fn describe(env: &SearchEnv<'_>) -> String {
    let s = env.structure;
    let full = s.widths(&s.full_plan());
    let base = cost(s.base()).macs.max(1);
    let mut out = String::from(
        "The model is the UNet noise predictor of a diffusion model. Its prunable units (name: \
         kind, current width, allowed widths, MACs saved by pruning it to its minimum):\n",
    );
    for (i, u) in s.units().iter().enumerate() {
        let mut w = full.clone();
        w[i] = u.min();
        let saved = base.saturating_sub(macs_of(s, &w)) as f64 / base as f64;
        let kind = match u.kind {
            UnitKind::Hidden => "resblock hidden channels",
            UnitKind::Heads => "attention heads",
            UnitKind::Stream => "residual-stream channels",
        };
        out.push_str(&format!(
            "- {}: {kind}, width {}, multiples of {} from {} to {}, {:.2}% of MACs\n",
            u.name,
            full[i],
            u.step,
            u.min(),
            u.full,
            100.0 * saved
        ));
    }
    let g = env.group;
    out.push_str(&format!(
        "\nThis pruned copy serves only timesteps {} to {} of {} (group {}; SNR from {:.2} dB to \
         {:.2} dB). Its budget: at most {} MACs, {:.4} of the base model's {} MACs.\nObjective: \
         choose the kept width of each unit to minimise the denoising loss on these timesteps \
         within the budget.\n",
        g.t_min,
        g.t_max,
        env.diffusion.num_timesteps(),
        g.index,
        g.snr_db_min,
        g.snr_db_max,
        env.bound,
        g.flops_bound,
        base
    ));
    out
}

/// The user message: architecture, memory bank, answer format.
fn user_prompt(architecture: &str, bank: &Bank, n: usize) -> String {
    let mut out = architecture.to_string();
    if bank.entries.is_empty() {
        out.push_str("\nNo plan has been measured yet.\n");
    } else {
        out.push_str("\nHere are some experimental results you can use as a reference:\n");
        for e in &bank.entries {
            let plan = serde_json::to_string(&e.plan).unwrap_or_default();
            out.push_str(&format!("{plan} gives loss {:.6} ({} MACs)\n", e.loss, e.macs));
        }
    }
    out.push_str(&format!(
        "\nPropose {n} new plans, different from those above. Answer with JSON only, no \
         explanation, in exactly this format: {{\"plans\": [{{\"<unit>\": <width>, ...}}, ...]}} \
         with exactly {n} plans; a unit left out keeps its current width.\n"
    ));
    out
}

/// The chat-completions request body (the key is not part of it).
fn request_body(p: &LlmParams, user: &str) -> Value {
    json!({
        "model": p.model,
        "temperature": p.temperature,
        "messages": [
            { "role": "system", "content": SYSTEM_PROMPT },
            { "role": "user", "content": user },
        ],
    })
}

/// One round's plans: from the response cache, or asked for with retries.
fn propose(
    conn: &mut Connection,
    p: &LlmParams,
    cache: &Path,
    request: &Value,
    s: &Structure,
) -> anyhow::Result<Vec<Plan>> {
    let canonical = serde_json::to_string(request)?;
    let cached = cache.join(format!("{}.json", blake3::hash(canonical.as_bytes()).to_hex()));
    if let Ok(body) = std::fs::read_to_string(&cached) {
        match parse_response(&body, s) {
            Ok(plans) => return Ok(plans),
            Err(e) => tracing::warn!(file = %cached.display(), "ignoring a cached response: {e}"),
        }
    }
    let mut last = String::new();
    let mut retry_after = None;
    for attempt in 0..=p.max_retries {
        if attempt > 0 {
            std::thread::sleep(retry_wait(p.backoff_ms, attempt, retry_after.take()));
        }
        let reason = match conn.send(&canonical)? {
            Reply::Body(body) => match parse_response(&body, s) {
                Ok(plans) => {
                    write_atomic(&cached, body.as_bytes())?;
                    return Ok(plans);
                }
                Err(e) => format!("the answer is not the requested JSON ({e})"),
            },
            Reply::Retry { why, after } => {
                retry_after = after;
                why
            }
        };
        tracing::warn!(attempt = attempt + 1, endpoint = %conn.url, "LLM request: {reason}");
        last = reason;
    }
    bail!(
        "the LLM endpoint `{}` gave no usable answer in {} attempts (max_retries = {}); last: {last}",
        conn.url,
        p.max_retries + 1,
        p.max_retries
    )
}

/// The wait before retry `attempt` (1-based): `backoff_ms * 2^(attempt - 1)`, or the server's
/// `Retry-After` when that is longer, at most [`MAX_RETRY_WAIT`].
pub fn retry_wait(backoff_ms: u64, attempt: usize, retry_after: Option<Duration>) -> Duration {
    let factor = 1u64 << attempt.saturating_sub(1).min(16);
    let backoff = Duration::from_millis(backoff_ms.saturating_mul(factor));
    backoff.max(retry_after.unwrap_or_default()).min(MAX_RETRY_WAIT)
}

/// The wait a `Retry-After` value asks for at `now`: delay-seconds (`120`) or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`; a date in the past asks for no wait). Other forms (the
/// obsolete RFC 850 and asctime dates) and garbage give `None`: the backoff alone applies.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 saturates: the cap applies anyway.
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = imf_fixdate(v)?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Parses `Sun, 06 Nov 1994 08:49:37 GMT`.
fn imf_fixdate(v: &str) -> Option<SystemTime> {
    let (_weekday, rest) = v.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else { return None };
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else { return None };
    if !(1..=31).contains(&day) || year < 1970 || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The HTTP client: rustls with the `ring` provider (see the module docs), `timeout` per request.
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::blocking::Client> {
    // Fails only when a provider is already installed in this process; that one is then used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .context("building the HTTP client")
}

/// What one attempt gave.
enum Reply {
    /// A 2xx body.
    Body(String),
    /// A transient failure worth retrying, with the server's `Retry-After`, if any.
    Retry { why: String, after: Option<Duration> },
}

impl Reply {
    fn retry(why: String) -> Reply {
        Reply::Retry { why, after: None }
    }
}

/// The HTTP client, built (and the key read) on the first request, so a fully cached run needs
/// no key.
struct Connection {
    url: String,
    key_env: String,
    timeout: Duration,
    inner: Option<(reqwest::blocking::Client, String)>,
}

impl Connection {
    fn new(p: &LlmParams) -> Connection {
        Connection {
            url: format!("{}/chat/completions", p.endpoint.trim_end_matches('/')),
            key_env: p.api_key_env.clone(),
            timeout: Duration::from_secs(p.timeout_s),
            inner: None,
        }
    }

    fn send(&mut self, body: &str) -> anyhow::Result<Reply> {
        if self.inner.is_none() {
            let key =
                std::env::var(&self.key_env).ok().filter(|k| !k.is_empty()).with_context(|| {
                    format!(
                        "the `llm` proxy needs an API key in the environment variable `{}` \
                         (`api_key_env`), which is not set",
                        self.key_env
                    )
                })?;
            let client = http_client(self.timeout)?;
            self.inner = Some((client, key));
        }
        let (client, key) = self.inner.as_ref().expect("set above");
        let redact = |t: &str| redact(t, key);
        let resp = match client
            .post(&self.url)
            .bearer_auth(key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
        {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Ok(Reply::retry(format!("no answer within {:?}", self.timeout)));
            }
            Err(e) => return Ok(Reply::retry(redact(&format!("request failed: {e}")))),
        };
        let status = resp.status();
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let text = match resp.text() {
            Ok(t) => t,
            Err(e) => return Ok(Reply::retry(redact(&format!("reading the answer failed: {e}")))),
        };
        if status.is_success() {
            // Redacted before anything reads it: the body is parsed, and stored in the response
            // cache, exactly as a later run will read it back.
            return Ok(Reply::Body(redact(&text)));
        }
        let shown: String = redact(&text).chars().take(2000).collect();
        if status.as_u16() == 429 || status.is_server_error() {
            let mut why = format!("HTTP {status}: {shown}");
            if let Some(a) = after {
                why.push_str(&format!(" (Retry-After: {} s)", a.as_secs()));
            }
            return Ok(Reply::Retry { why, after });
        }
        bail!("the LLM endpoint `{}` answered HTTP {status}: {shown}", self.url)
    }
}

/// What the API key is replaced with wherever a response would carry it.
pub const REDACTED: &str = "<redacted>";

/// `text` with every occurrence of `key` replaced by [`REDACTED`], as it is and as a JSON string
/// escapes it (a server echoing the `Authorization` header in a JSON body may escape `/` or
/// `"`).
pub fn redact(text: &str, key: &str) -> String {
    if key.is_empty() {
        return text.to_string();
    }
    let mut out = text.replace(key, REDACTED);
    let escaped = serde_json::to_string(key).unwrap_or_default();
    let escaped = escaped.trim_matches('"');
    for form in [escaped.to_string(), escaped.replace('/', "\\/")] {
        if !form.is_empty() && form != key {
            out = out.replace(&form, REDACTED);
        }
    }
    out
}

/// The JSON inside a chat answer: code fences stripped, else the outermost `{...}`.
fn strip_fences(content: &str) -> &str {
    let t = content.trim();
    if let Some(start) = t.find("```") {
        let after = &t[start + 3..];
        let body = after.find('\n').map_or(after, |nl| &after[nl + 1..]);
        let end = body.find("```").unwrap_or(body.len());
        return body[..end].trim();
    }
    match (t.find('{'), t.rfind('}')) {
        (Some(a), Some(b)) if a < b => &t[a..=b],
        _ => t,
    }
}

/// Plans from a chat-completions response body (widths not yet fitted).
fn parse_response(body: &str, s: &Structure) -> Result<Vec<Plan>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or("no `choices[0].message.content` string")?;
    let answer: Value = serde_json::from_str(strip_fences(content))
        .map_err(|e| format!("the message is not JSON: {e}"))?;
    let plans = answer.get("plans").and_then(Value::as_array).ok_or("no `plans` array")?;
    plans
        .iter()
        .map(|p| -> Result<Plan, String> {
            let obj = p.as_object().ok_or("a plan is not an object")?;
            let mut plan = Plan::new();
            for (name, w) in obj {
                if s.unit_index(name).is_none() {
                    continue;
                }
                let w = w.as_f64().ok_or_else(|| format!("`{name}` is not a number"))?;
                let w = if w.is_finite() && w > 0.0 { w.round().min(1e9) as usize } else { 0 };
                plan.insert(name.clone(), w);
            }
            Ok(plan)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{
        MAX_RETRY_WAIT, REDACTED, http_client, parse_retry_after, redact, retry_wait, strip_fences,
    };

    #[test]
    fn the_key_is_redacted_raw_and_json_escaped() {
        let key = r#"sk-a/b"c\d"#;
        let body = serde_json::json!({ "echo": format!("Bearer {key}") }).to_string();
        let escaped_slash = body.replace('/', "\\/");
        for text in [format!("raw {key} twice {key}"), body, escaped_slash] {
            let out = redact(&text, key);
            assert!(!out.contains(key), "{out}");
            assert!(!out.contains(r#"sk-a/b\"c"#) && !out.contains(r#"sk-a\/b"#), "{out}");
            assert!(out.contains(REDACTED), "{out}");
        }
        assert_eq!(redact("nothing here", key), "nothing here");
        assert_eq!(redact("x", ""), "x");
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37
        let secs = |v: &str| parse_retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs("1"), Some(1));
        assert_eq!(secs(" 120 "), Some(120));
        assert_eq!(secs("99999999999999999999999"), Some(u64::MAX));
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), Some(0));
        assert_eq!(secs("Sun, 06 Nov 1994 08:50:07 GMT"), Some(30));
        assert_eq!(secs("Mon, 07 Nov 1994 08:49:37 GMT"), Some(86_400));
        assert_eq!(secs("Sat, 01 Mar 2025 00:00:00 GMT"), Some(1_740_787_200 - 784_111_777));
        assert_eq!(secs("Sun, 06 Nov 1994 08:00:00 GMT"), Some(0), "a past date: no wait");
        for bad in ["", "-1", "1.5", "soon", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun, 06 Nov 1994"] {
            assert_eq!(secs(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_wait_is_the_longer_of_backoff_and_retry_after_capped() {
        let ms = Duration::from_millis;
        assert_eq!(retry_wait(100, 1, None), ms(100));
        assert_eq!(retry_wait(100, 3, None), ms(400));
        assert_eq!(retry_wait(100, 1, Some(ms(1000))), ms(1000));
        assert_eq!(retry_wait(100, 3, Some(ms(50))), ms(400), "never shorter than the backoff");
        assert_eq!(retry_wait(100, 1, Some(Duration::from_secs(3600))), MAX_RETRY_WAIT);
        assert_eq!(retry_wait(u64::MAX, 60, None), MAX_RETRY_WAIT);
    }

    #[test]
    fn the_https_client_builds_with_the_ring_provider() {
        // Without a crypto provider reqwest's `rustls-no-provider` panics when building.
        let client = http_client(Duration::from_secs(1)).unwrap();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        // A TLS handshake with a server that does not speak TLS fails as an error, not a panic.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                use std::io::Write;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let err = client.get(format!("https://{addr}/")).send().unwrap_err();
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }

    #[test]
    fn fences_and_prose_are_stripped() {
        assert_eq!(strip_fences("```json\n{\"plans\": []}\n```"), "{\"plans\": []}");
        assert_eq!(strip_fences("Sure: {\"plans\": []} done"), "{\"plans\": []}");
        assert_eq!(strip_fences(" {\"a\":1} "), "{\"a\":1}");
    }
}
