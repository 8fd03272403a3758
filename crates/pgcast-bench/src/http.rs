//! A minimal HTTP/1.1 client over one keep-alive TCP connection, enough to poll `/ready`, read
//! `/metrics` and post to pgcast's REST broadcast endpoint.
//!
//! It is not a general HTTP client: no TLS, no chunked bodies (pgcast answers with
//! `Content-Length`), no redirects; responses larger than 16 MiB are refused.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MAX_BODY: usize = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpConnection {
    addr: SocketAddr,
    stream: BufReader<TcpStream>,
}

impl HttpConnection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<HttpConnection> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection { addr, stream: BufReader::new(stream) })
    }

    /// Sends one request and reads the response: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        tokio::time::timeout(TIMEOUT, self.exchange(method, path, headers, body))
            .await
            .with_context(|| format!("{method} {path}: no answer within {TIMEOUT:?}"))?
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;

        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            bail!("{method} {path}: connection closed before a response");
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{method} {path}: bad status line {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("{method} {path}: connection closed inside the response headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().context("bad Content-Length")?;
                }
            }
        }
        if length > MAX_BODY {
            bail!("{method} {path}: response of {length} bytes is too large");
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    HttpConnection::open(addr).await?.request("GET", path, &[], &[]).await
}

/// The cumulative buckets `(le, count)` of a Prometheus histogram on a text page, in page
/// order (ascending `le`, `+Inf` last).
pub fn histogram_buckets(page: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// One unlabelled value from a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
