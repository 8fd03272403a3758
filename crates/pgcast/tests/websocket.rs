//! The Supabase endpoint's own WebSocket (RFC 6455) driven byte by byte from a raw TCP client:
//! the handshake, frames sent with it, every length form, fragments with a ping between them,
//! a frame dribbled one byte per write, refused handshakes, and each protocol violation closed
//! with its code and reason while other clients carry on.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455 1.3's worked example for `KEY`.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

use pgcast::transport::frame::opcode::{BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT};

/// A client frame, masked unless `masked` is false.
fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn heartbeat(r: &str, padding: usize) -> String {
    format!(
        r#"{{"topic":"phoenix","event":"heartbeat","payload":{{"pad":"{}"}},"ref":"{r}"}}"#,
        "x".repeat(padding)
    )
}

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn request(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: pgcast\r\n{headers}\r\n")
}

fn upgrade_headers() -> String {
    format!(
        "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
    )
}

impl Raw {
    /// Sends the request (and `early` bytes in the same write) and reads the response head.
    async fn open(addr: SocketAddr, request: &str, early: &[u8]) -> (Raw, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut bytes = request.as_bytes().to_vec();
        bytes.extend_from_slice(early);
        stream.write_all(&bytes).await.expect("write request");
        let mut raw = Raw { stream, buf: Vec::new() };
        let head = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
                    raw.buf.drain(..end + 4);
                    return head;
                }
                raw.read_more().await;
            }
        })
        .await
        .expect("a response in time");
        (raw, head)
    }

    async fn connect(addr: SocketAddr, early: &[u8]) -> Raw {
        let path = format!("/realtime/v1/websocket?vsn=1.0.0&apikey={}", token("service_role", 600));
        let (raw, head) = Raw::open(addr, &request(&path, &upgrade_headers()), early).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("sec-websocket-accept: {}", ACCEPT.to_ascii_lowercase())),
            "{head}"
        );
        raw
    }

    async fn read_more(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed; buffered {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next server frame: (fin, opcode, payload). Server frames are never masked.
    async fn next_frame(&mut self) -> (bool, u8, Vec<u8>) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if self.buf.len() >= 2 {
                    assert_eq!(self.buf[1] & 0x80, 0, "server frames are unmasked");
                    let (len, at) = match self.buf[1] & 0x7F {
                        126 if self.buf.len() >= 4 => {
                            (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                        }
                        127 if self.buf.len() >= 10 => {
                            (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
                        }
                        126 | 127 => (usize::MAX, 0),
                        n => (n as usize, 2),
                    };
                    if len != usize::MAX && self.buf.len() >= at + len {
                        let first = self.buf[0];
                        let payload = self.buf[at..at + len].to_vec();
                        self.buf.drain(..at + len);
                        return (first & 0x80 != 0, first & 0x0F, payload);
                    }
                }
                self.read_more().await;
            }
        })
        .await
        .expect("a frame in time")
    }

    /// The next text frame's JSON (control frames skipped but returned in `controls`).
    async fn next_text(&mut self) -> serde_json::Value {
        loop {
            let (fin, opcode, payload) = self.next_frame().await;
            assert!(fin, "the server sends whole messages");
            if opcode == TEXT {
                return serde_json::from_slice(&payload).expect("JSON text");
            }
        }
    }

    async fn expect_reply(&mut self, r: &str) {
        let reply = self.next_text().await;
        assert_eq!((reply["event"].as_str(), reply["ref"].as_str()), (Some("phx_reply"), Some(r)), "{reply}");
        assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    }

    /// The server's Close frame: (code, reason).
    async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let (_, opcode, payload) = self.next_frame().await;
            if opcode == CLOSE {
                assert!(payload.len() >= 2, "a close frame with a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason"));
            }
        }
    }
}

async fn setup(name: &str) -> (Pg, pgcast::server::RunningServer) {
    start_with(name, "CREATE TABLE t (id int PRIMARY KEY);", &["t"], |_| {}).await
}

#[tokio::test]
async fn frames_in_every_form_are_read_whole() {
    let (_pg, server) = setup("ws_frames").await;
    // A frame sent in the same write as the handshake is not lost.
    let mut raw = Raw::connect(server.addr, &frame(true, TEXT, heartbeat("1", 0).as_bytes(), true)).await;
    raw.expect_reply("1").await;

    // The three length forms: 7-bit, 16-bit, 64-bit.
    for (r, padding) in [("2", 10), ("3", 1_000), ("4", 70_000)] {
        raw.send(&frame(true, TEXT, heartbeat(r, padding).as_bytes(), true)).await;
        raw.expect_reply(r).await;
    }

    // A message in three fragments with a ping between them: the pong (same payload) comes
    // at once, the reply once the message is whole.
    let text = heartbeat("5", 300);
    let (a, rest) = text.as_bytes().split_at(100);
    let (b, c) = rest.split_at(100);
    let mut bytes = frame(false, TEXT, a, true);
    bytes.extend(frame(false, CONTINUATION, b, true));
    bytes.extend(frame(true, PING, b"are you there", true));
    raw.send(&bytes).await;
    assert_eq!(raw.next_frame().await, (true, PONG, b"are you there".to_vec()));
    raw.send(&frame(true, CONTINUATION, c, true)).await;
    raw.expect_reply("5").await;

    // One byte per write, and two frames in one write.
    for byte in frame(true, TEXT, heartbeat("6", 200).as_bytes(), true) {
        raw.send(&[byte]).await;
    }
    raw.expect_reply("6").await;
    let mut two = frame(true, TEXT, heartbeat("7", 0).as_bytes(), true);
    two.extend(frame(true, TEXT, heartbeat("8", 0).as_bytes(), true));
    raw.send(&two).await;
    raw.expect_reply("7").await;
    raw.expect_reply("8").await;

    // A client Close is answered with a Close echoing its code, then the connection ends.
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"done");
    raw.send(&frame(true, CLOSE, &close, true)).await;
    assert_eq!(raw.expect_close().await, (1000, "done".to_string()));
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, raw.stream.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(_)) | Ok(Err(_))), "the server closes the connection");
}

#[tokio::test]
async fn protocol_violations_close_with_their_code_and_reason() {
    let (_pg, server) = setup("ws_violations").await;
    let mut reserved_bits = frame(true, TEXT, b"{}", true);
    reserved_bits[0] |= 0x40;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("unmasked", frame(true, TEXT, b"{}", false), 1002, "client frames must be masked"),
        ("reserved opcode", frame(true, 0x3, b"", true), 1002, "reserved opcode 0x3"),
        ("reserved bits", reserved_bits, 1002, "reserved bits set"),
        ("stray continuation", frame(true, CONTINUATION, b"x", true), 1002, "continuation frame without"),
        ("fragmented ping", frame(false, PING, b"", true), 1002, "control frames must not be fragmented"),
        ("long ping", frame(true, PING, &[0; 126], true), 1002, "longer than 125 bytes"),
        (
            "interleaved message",
            [frame(false, TEXT, b"{", true), frame(true, BINARY, b"x", true)].concat(),
            1002,
            "before the fragmented one ended",
        ),
        ("invalid UTF-8", frame(true, TEXT, &[b'"', 0xFF, 0xFE, b'"'], true), 1007, "not valid UTF-8"),
        ("bad close code", frame(true, CLOSE, &1005u16.to_be_bytes(), true), 1002, "invalid close code 1005"),
    ];
    let mut bystander = Raw::connect(server.addr, b"").await;
    for (n, (case, bytes, code, reason)) in cases.into_iter().enumerate() {
        let mut raw = Raw::connect(server.addr, b"").await;
        raw.send(&bytes).await;
        let (got_code, got_reason) = raw.expect_close().await;
        assert_eq!(got_code, code, "{case}: {got_reason}");
        assert!(
            got_reason.starts_with("protocol error: ") && got_reason.contains(reason),
            "{case}: {got_reason}"
        );
        // Nobody else is affected.
        let r = format!("b{n}");
        bystander.send(&frame(true, TEXT, heartbeat(&r, 0).as_bytes(), true)).await;
        bystander.expect_reply(&r).await;
    }
}

#[tokio::test]
async fn handshakes_that_are_not_websocket_upgrades_are_refused_with_a_reason() {
    let (_pg, server) = setup("ws_handshake").await;
    let path = "/realtime/v1/websocket?vsn=1.0.0";
    let no_key = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n".to_string();
    let old_version = format!("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n");
    let no_upgrade =
        format!("Connection: keep-alive\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n");
    for (headers, status, text) in [
        (no_key, "400", "`Sec-WebSocket-Key` header missing"),
        (old_version, "400", "`Sec-WebSocket-Version` header did not include '13'"),
        (no_upgrade, "400", "Connection header did not include 'upgrade'"),
    ] {
        let (mut raw, head) = Raw::open(server.addr, &request(path, &headers), b"").await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        let body = tokio::time::timeout(DEADLINE, async {
            while !String::from_utf8_lossy(&raw.buf).contains(text) {
                raw.read_more().await;
            }
        })
        .await;
        assert!(body.is_ok(), "{head}: {:?}", String::from_utf8_lossy(&raw.buf));
    }
}
