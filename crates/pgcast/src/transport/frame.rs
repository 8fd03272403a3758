//! RFC 6455 framing as a server sees it: client frame headers read from bytes (masked, as a
//! client must send them), server frame headers written (unmasked), close payloads. Pure
//! functions over slices, never panicking on client bytes (seeded fuzz test below).
//!
//! Not the connection: reading, writing, fragmentation and the close handshake are
//! `websocket.rs`'s.

use crate::outbound::close_code;

/// Frame opcodes (RFC 6455 5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Longest header a frame can have: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER: usize = 14;
/// Longest header the server writes (it does not mask).
pub const MAX_SERVER_HEADER: usize = 10;
/// Largest payload of a control frame (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why the client's bytes are not a WebSocket frame the server may accept; the text is the
/// close reason sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("control frames must not be fragmented")]
    FragmentedControl,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("frame length has its most significant bit set")]
    LengthOverflow,
    #[error("continuation frame without a message to continue")]
    StrayContinuation,
    #[error("new message before the fragmented one ended")]
    UnfinishedMessage,
    #[error("close frame with a one-byte payload")]
    ShortClose,
    #[error("invalid close code {0}")]
    CloseCode(u16),
    #[error("text is not valid UTF-8")]
    Utf8,
}

impl FrameError {
    /// The close code the server answers this error with (RFC 6455 7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Utf8 => close_code::INVALID_PAYLOAD,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// A client frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    /// Payload length.
    pub len: u64,
    /// Bytes the header itself takes.
    pub header_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Reads a client frame's header from the start of `buf`: `None` until `buf` holds all of it.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let (Some(&first), Some(&second)) = (buf.first(), buf.get(1)) else { return Ok(None) };
    if first & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin {
                return Err(FrameError::FragmentedControl);
            }
        }
        other => return Err(FrameError::ReservedOpcode(other)),
    }
    if second & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, at) = match second & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(b);
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if opcode & 0x8 != 0 && len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(FrameError::ControlTooLong);
    }
    let Some(m) = buf.get(at..at + 4) else { return Ok(None) };
    Ok(Some(Header { fin, opcode, mask: [m[0], m[1], m[2], m[3]], len, header_len: at + 4 }))
}

/// Unmasks (or masks) `payload` in place; `offset` is the position of `payload[0]` in the
/// frame's payload.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[(offset + i) & 3];
    }
}

/// A server frame's header (FIN set, unmasked) for a payload of `len` bytes: the bytes and
/// how many of them are used.
pub fn server_header(opcode: u8, len: usize) -> ([u8; MAX_SERVER_HEADER], u8) {
    let mut head = [0u8; MAX_SERVER_HEADER];
    head[0] = 0x80 | opcode;
    let used = if len < 126 {
        head[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, used)
}

/// A close frame's code and reason (RFC 6455 5.5.1, 7.4): `None` for an empty payload.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::ShortClose),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(code) {
                return Err(FrameError::CloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Utf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 7.4.1-2; the registry's 1012-1014
/// are in use too).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A close frame's payload: the code and as much of `reason` as fits in a control frame,
/// cut on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::XorShift;

    /// A client frame as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        let start = frame.len();
        frame.extend_from_slice(payload);
        apply_mask(&mut frame[start..], mask, 0);
        frame
    }

    #[test]
    fn headers_of_every_length_form_are_read_and_need_all_their_bytes() {
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 1_000_000] {
            let payload = vec![7u8; len];
            let frame = client_frame(true, opcode::BINARY, &payload, [1, 2, 3, 4]);
            let header = parse_header(&frame).expect("valid").expect("complete");
            assert_eq!((header.len, header.opcode, header.fin), (len as u64, opcode::BINARY, true));
            assert_eq!(header.header_len, frame.len() - len);
            for cut in 0..header.header_len {
                assert_eq!(parse_header(&frame[..cut]), Ok(None), "len {len}, cut {cut}");
            }
        }
    }

    #[test]
    fn frames_a_server_must_refuse_are_refused_with_their_reason() {
        let mask = [9, 9, 9, 9];
        let mut rsv = client_frame(true, opcode::TEXT, b"x", mask);
        rsv[0] |= 0x40;
        assert_eq!(parse_header(&rsv), Err(FrameError::ReservedBits));
        assert_eq!(parse_header(&client_frame(true, 0x3, b"", mask)), Err(FrameError::ReservedOpcode(3)));
        assert_eq!(parse_header(&client_frame(true, 0xB, b"", mask)), Err(FrameError::ReservedOpcode(0xB)));
        assert_eq!(parse_header(&[0x81, 0x01, b'x']), Err(FrameError::Unmasked));
        assert_eq!(
            parse_header(&client_frame(false, opcode::PING, b"", mask)),
            Err(FrameError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&client_frame(true, opcode::PING, &[0; 126], mask)),
            Err(FrameError::ControlTooLong)
        );
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&mask);
        assert_eq!(parse_header(&huge), Err(FrameError::LengthOverflow));
    }

    #[test]
    fn masking_is_its_own_inverse_at_any_offset() {
        let text = b"hello, websocket world".to_vec();
        let mut masked = text.clone();
        apply_mask(&mut masked, [0xA1, 0xB2, 0xC3, 0xD4], 0);
        assert_ne!(masked, text);
        // In two pieces, as a payload arriving in two reads would be.
        let (a, b) = masked.split_at_mut(5);
        apply_mask(a, [0xA1, 0xB2, 0xC3, 0xD4], 0);
        apply_mask(b, [0xA1, 0xB2, 0xC3, 0xD4], 5);
        assert_eq!(masked, text);
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        assert_eq!(server_header(opcode::TEXT, 5), ([0x81, 5, 0, 0, 0, 0, 0, 0, 0, 0], 2));
        let (head, used) = server_header(opcode::BINARY, 300);
        assert_eq!(&head[..used as usize], &[0x82, 126, 1, 44]);
        let (head, used) = server_header(opcode::TEXT, 70_000);
        assert_eq!(&head[..used as usize], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn close_payloads_round_trip_and_bad_ones_are_named() {
        assert_eq!(parse_close(b""), Ok(None));
        assert_eq!(parse_close(&close_payload(1000, "bye")), Ok(Some((1000, "bye"))));
        assert_eq!(parse_close(&[3]), Err(FrameError::ShortClose));
        assert_eq!(parse_close(&close_payload(1005, "")), Err(FrameError::CloseCode(1005)));
        assert_eq!(parse_close(&close_payload(999, "")), Err(FrameError::CloseCode(999)));
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]), Err(FrameError::Utf8));
        // A long reason is cut to fit a control frame, on a character boundary.
        let long = "é".repeat(100);
        let payload = close_payload(4000, &long);
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert!(matches!(parse_close(&payload), Ok(Some((4000, reason))) if long.starts_with(reason)));
    }

    #[test]
    fn fuzz_header_reader_never_panics_and_agrees_with_the_writer() {
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        let mut complete = 0;
        for _ in 0..100_000 {
            let len = [0, 1, 125, 126, 127, 200, 65_536][rng.below(7)];
            let opcode = [0u8, 1, 2, 8, 9, 10, 3, 0xF][rng.below(8)];
            let mut bytes =
                client_frame(rng.below(4) != 0, opcode, &vec![0u8; len.min(130)], [1, 2, 3, 4])[..].to_vec();
            if len > 130 {
                // Claim a longer payload than is present: the header alone must decide.
                bytes[1] = 0x80 | 127;
                bytes.splice(2..2, (len as u64).to_be_bytes());
            }
            for _ in 0..rng.below(4) {
                let at = rng.below(bytes.len().max(1));
                if let Some(b) = bytes.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
            bytes.truncate(rng.below(bytes.len() + 1));
            if let Ok(Some(header)) = parse_header(&bytes) {
                complete += 1;
                assert!(header.header_len <= MAX_HEADER && header.header_len <= bytes.len());
                assert!(!header.is_control() || header.len <= MAX_CONTROL_PAYLOAD as u64);
                // The same length written by the server reads back (masked as a client would).
                if let Ok(n) = usize::try_from(header.len) {
                    let (head, used) = server_header(header.opcode, n);
                    let mut again = head[..used as usize].to_vec();
                    again[1] |= 0x80;
                    again.extend_from_slice(&header.mask);
                    let back = parse_header(&again).expect("valid").expect("complete");
                    assert_eq!((back.len, back.opcode), (header.len, header.opcode));
                }
            }
            let _ = parse_close(&bytes);
        }
        assert!(complete > 10_000, "{complete}");
    }
}
