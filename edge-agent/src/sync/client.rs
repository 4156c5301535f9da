//! One sync exchange over HTTP: encode the request in the versioned envelope, POST it with the
//! store's bearer token, and classify what comes back, so the sync task knows whether to retry
//! soon (the cloud is down, slow, answering 5xx, or cut the answer short) or to report a refusal
//! a person must act on (a wrong token, a store writing what it does not own, a skewed clock).

use std::time::Duration;

use shared::sync::{SyncRequest, SyncResponse};
use shared::{wire, StoreId};

/// Largest answer accepted from the cloud: a page of at most `MAX_PAGE_ROWS` rows is far below.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// No answer: connection refused, reset, or timed out. Retry with backoff.
    #[error("cloud unreachable: {0}")]
    Unreachable(String),
    /// The cloud answered 5xx (or 429): it is up but cannot serve now. Retry with backoff.
    #[error("cloud answered {status}: {message}")]
    Unavailable { status: u16, message: String },
    /// The cloud refused the request (4xx): retrying the same will not help until someone fixes
    /// the cause (token, clock, a bug). Still retried, slowly, and never drops local changes.
    #[error("cloud refused the sync with {status}: {message}")]
    Refused { status: u16, message: String },
    /// The answer was cut short or is not a sync answer this build reads. Retry with backoff.
    #[error("unreadable answer from the cloud: {0}")]
    BadAnswer(String),
}

impl ExchangeError {
    /// The error code technicians filter the journal by.
    pub fn code(&self) -> &'static str {
        match self {
            ExchangeError::Unreachable(_) => "SYNC_UNREACHABLE",
            ExchangeError::Unavailable { .. } => "SYNC_UNAVAILABLE",
            ExchangeError::Refused { status: 401, .. } => "SYNC_BAD_TOKEN",
            ExchangeError::Refused { status: 403, .. } => "SYNC_FORBIDDEN",
            ExchangeError::Refused { status: 409, .. } => "SYNC_CLOCK_SKEW",
            ExchangeError::Refused { status: 413, .. } => "SYNC_PAGE_TOO_LARGE",
            ExchangeError::Refused { .. } => "SYNC_REFUSED",
            ExchangeError::BadAnswer(_) => "SYNC_BAD_ANSWER",
        }
    }
}

pub struct SyncClient {
    http: reqwest::Client,
    endpoint: String,
    token: String,
}

impl SyncClient {
    /// `base_url` like `http://127.0.0.1:8750` or `https://cloud.example.com`.
    pub fn new(base_url: &str, store: &StoreId, token: String, timeout: Duration) -> Result<SyncClient, String> {
        // One rustls provider for the whole process (DESIGN 12); a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let endpoint = format!("{}/v1/stores/{}/sync", base_url.trim_end_matches('/'), store);
        Ok(SyncClient { http, endpoint, token })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn exchange(&self, request: &SyncRequest) -> Result<(SyncResponse, ExchangeBytes), ExchangeError> {
        let body =
            wire::encode(request).map_err(|e| ExchangeError::BadAnswer(format!("cannot encode the request: {e}")))?;
        let sent = body.len();
        let response = self
            .http
            .post(&self.endpoint)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/x-postcard")
            .body(body)
            .send()
            .await
            .map_err(|e| ExchangeError::Unreachable(describe(&e)))?;
        let status = response.status();
        let bytes = read_limited(response).await?;
        if !status.is_success() {
            let message = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).trim().to_owned();
            let status = status.as_u16();
            return Err(if status >= 500 || status == 429 {
                ExchangeError::Unavailable { status, message }
            } else {
                ExchangeError::Refused { status, message }
            });
        }
        let answer = wire::decode::<SyncResponse>(&bytes).map_err(|e| ExchangeError::BadAnswer(e.to_string()))?;
        Ok((answer, ExchangeBytes { sent, received: bytes.len() }))
    }
}

/// Bytes on the wire for one exchange (bodies only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeBytes {
    pub sent: usize,
    pub received: usize,
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ExchangeError> {
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(ExchangeError::BadAnswer(format!("answer larger than {MAX_RESPONSE_BYTES} bytes")));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(bytes),
            // A body cut short (the cloud died mid-answer) surfaces here.
            Err(e) => return Err(ExchangeError::BadAnswer(format!("answer cut short: {}", describe(&e)))),
        }
    }
}

/// reqwest's Display hides the cause ("error sending request"); technicians need it.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
