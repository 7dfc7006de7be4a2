//! Property tests: encode → decode is the identity for every representable
//! frame, whatever the chunking of the byte stream, and no input panics.

use bytes::BytesMut;
use fmq_proto::{Command, Frame, Headers, Item, Limits, StompCodec, Version};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

/// Characters that exercise escaping, plus arbitrary unicode.
fn header_char(allow_cr: bool) -> impl Strategy<Value = char> {
    prop_oneof![
        3 => proptest::char::range('a', 'z'),
        1 => Just(':'),
        1 => Just('\n'),
        1 => Just(if allow_cr { '\r' } else { 'r' }),
        1 => Just('\\'),
        1 => Just('\0'),
        1 => Just('é'),
        1 => Just('😀'),
        2 => any::<char>().prop_map(move |c| if c == '\r' && !allow_cr { 'x' } else { c }),
    ]
}

fn header_string(allow_cr: bool) -> impl Strategy<Value = String> {
    proptest::collection::vec(header_char(allow_cr), 0..12).prop_map(|v| v.into_iter().collect())
}

/// Commands whose headers are escaped (all but CONNECT/STOMP/CONNECTED).
fn escaped_command() -> impl Strategy<Value = Command> {
    proptest::sample::select(
        Command::ALL
            .iter()
            .copied()
            .filter(|c| c.escapes_headers())
            .collect::<Vec<_>>(),
    )
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![3 => any::<u8>(), 1 => Just(0u8)], 0..300)
}

fn frame(allow_cr: bool) -> impl Strategy<Value = Frame> {
    (
        escaped_command(),
        proptest::collection::vec((header_string(allow_cr), header_string(allow_cr)), 0..8),
        body(),
    )
        .prop_map(|(command, headers, body)| Frame {
            command,
            headers: headers
                .into_iter()
                .filter(|(n, _)| n != "content-length")
                .collect(),
            body: body.into(),
        })
}

/// What the decoder should produce for `frame`: the encoder appends a
/// `content-length` header for non-empty bodies.
fn expected(frame: &Frame) -> Frame {
    let mut f = frame.clone();
    if !f.body.is_empty() {
        f.headers.push("content-length", f.body.len().to_string());
    }
    f
}

/// Feeds `bytes` in chunks of the given sizes (cycled) and collects items.
fn decode_chunked(codec: &mut StompCodec, bytes: &[u8], chunks: &[usize]) -> Vec<Item> {
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().cycle();
    while pos < bytes.len() {
        let n = (*sizes.next().unwrap_or(&1)).max(1).min(bytes.len() - pos);
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        while let Some(item) = codec.decode(&mut buf).expect("valid stream must decode") {
            items.push(item);
        }
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    assert_eq!(codec.decode_eof(&mut buf).expect("clean eof"), None);
    items
}

fn round_trip(version: Version, frames: &[Frame], chunks: &[usize]) {
    let mut codec = StompCodec::new(Limits::default());
    codec.set_version(version);
    let mut wire = BytesMut::new();
    let mut want = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        if i % 2 == 1 {
            codec
                .encode(Item::HeartBeat, &mut wire)
                .expect("heart-beat");
            want.push(Item::HeartBeat);
        }
        codec.encode(f, &mut wire).expect("encodable frame");
        want.push(Item::Frame(expected(f)));
    }
    let got = decode_chunked(&mut codec, &wire, chunks);
    assert_eq!(got, want);
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..64, 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_v1_2(frames in proptest::collection::vec(frame(true), 1..4), chunks in chunks()) {
        round_trip(Version::V1_2, &frames, &chunks);
    }

    #[test]
    fn round_trip_v1_1(frames in proptest::collection::vec(frame(false), 1..4), chunks in chunks()) {
        round_trip(Version::V1_1, &frames, &chunks);
    }

    /// 1.0 and CONNECT frames have no escaping: only headers without line
    /// breaks (and without colons in names) are representable.
    #[test]
    fn round_trip_unescaped(
        connect in any::<bool>(),
        headers in proptest::collection::vec(("[a-z\\\\é-]{0,8}", "[a-z:\\\\é -]{0,8}"), 0..6),
        body in body(),
        chunks in chunks(),
    ) {
        let command = if connect { Command::Connect } else { Command::Send };
        let version = if connect { Version::V1_2 } else { Version::V1_0 };
        let f = Frame {
            command,
            headers: headers.into_iter().collect::<Headers>(),
            body: body.into(),
        };
        round_trip(version, &[f], &chunks);
    }

    /// Random bytes never panic, whatever the limits and chunking.
    #[test]
    fn garbage_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        chunks in chunks(),
        version in proptest::sample::select(vec![Version::V1_0, Version::V1_1, Version::V1_2]),
    ) {
        feed_garbage(&bytes, &chunks, version);
    }

    /// Garbage assembled from protocol tokens reaches the deeper states
    /// (headers, escapes, content-length bodies).
    #[test]
    fn token_soup_never_panics(
        tokens in proptest::collection::vec(proptest::sample::select(vec![
            "SEND", "CONNECT", "MESSAGE", "\n", "\r\n", "\r", ":", "\\", "\\n", "\\c", "\\r",
            "\\t", "content-length:", "0", "3", "12", "99999999999999999999", "-1", "\0",
            "abc", "é", "\u{ff}",
        ]), 0..200),
        chunks in chunks(),
        version in proptest::sample::select(vec![Version::V1_0, Version::V1_1, Version::V1_2]),
    ) {
        let bytes: Vec<u8> = tokens.concat().into_bytes();
        feed_garbage(&bytes, &chunks, version);
    }
}

fn feed_garbage(bytes: &[u8], chunks: &[usize], version: Version) {
    let limits = Limits {
        max_frame_size: 256,
        max_headers: 8,
        max_header_length: 32,
    };
    let mut codec = StompCodec::new(limits);
    codec.set_version(version);
    let mut buf = BytesMut::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().cycle();
    while pos < bytes.len() {
        let n = (*sizes.next().unwrap_or(&1)).max(1).min(bytes.len() - pos);
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Item::Frame(f))) => {
                    // Whatever decodes must stay within the limits...
                    assert!(f.headers.len() <= limits.max_headers);
                    assert!(f.body.len() <= limits.max_frame_size);
                    // ...and re-encode without panicking.
                    let mut out = BytesMut::new();
                    let _ = codec.encode(&f, &mut out);
                }
                Ok(Some(Item::HeartBeat)) => {}
                Ok(None) => break,
                Err(e) => {
                    // Every error renders into an ERROR frame.
                    let _ = e.to_frame();
                    return;
                }
            }
        }
        // The decoder never holds much more than one frame's limit.
        assert!(buf.len() <= limits.max_frame_size + 64 + 1);
    }
    let _ = codec.decode_eof(&mut buf);
}
