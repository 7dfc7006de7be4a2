use super::*;

fn small_limits() -> Limits {
    Limits {
        max_frame_size: 64,
        max_headers: 3,
        max_header_length: 16,
    }
}

/// Decodes everything currently decodable from `input`.
fn decode_all(codec: &mut StompCodec, input: &[u8]) -> Result<Vec<Item>> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(item) = codec.decode(&mut buf)? {
        out.push(item);
    }
    Ok(out)
}

fn frames(items: Vec<Item>) -> Vec<Frame> {
    items
        .into_iter()
        .filter_map(|i| match i {
            Item::Frame(f) => Some(f),
            Item::HeartBeat => None,
        })
        .collect()
}

fn one_frame(version: Version, input: &[u8]) -> Frame {
    let mut codec = StompCodec::default();
    codec.set_version(version);
    let mut f = frames(decode_all(&mut codec, input).unwrap());
    assert_eq!(f.len(), 1, "expected one frame from {input:?}");
    f.remove(0)
}

fn decode_err(codec: &mut StompCodec, input: &[u8]) -> Error {
    match decode_all(codec, input) {
        Ok(items) => panic!("expected an error, got {items:?}"),
        Err(e) => e,
    }
}

fn encode(version: Version, frame: &Frame) -> Vec<u8> {
    let mut codec = StompCodec::default();
    codec.set_version(version);
    let mut dst = BytesMut::new();
    codec.encode(frame, &mut dst).unwrap();
    dst.to_vec()
}

// ---- grammar -------------------------------------------------------------

#[test]
fn decodes_a_simple_frame() {
    let f = one_frame(
        Version::V1_2,
        b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello\0",
    );
    assert_eq!(f.command, Command::Send);
    assert_eq!(f.get("destination"), Some("/queue/a"));
    assert_eq!(f.get("content-type"), Some("text/plain"));
    assert_eq!(&f.body[..], b"hello");
}

#[test]
fn decodes_frame_without_headers_or_body() {
    let f = one_frame(Version::V1_2, b"DISCONNECT\n\n\0");
    assert_eq!(f, Frame::new(Command::Disconnect));
}

#[test]
fn crlf_line_endings() {
    let f = one_frame(
        Version::V1_2,
        b"SEND\r\ndestination:/queue/a\r\nreceipt:7\r\n\r\nbody\0",
    );
    assert_eq!(f.command, Command::Send);
    assert_eq!(f.get("destination"), Some("/queue/a"));
    assert_eq!(f.get("receipt"), Some("7"));
    assert_eq!(&f.body[..], b"body");
}

#[test]
fn header_split_on_first_colon_and_may_be_empty() {
    let f = one_frame(Version::V1_0, b"SEND\na:b:c\n:\nempty:\n:noname\n\n\0");
    let h: Vec<_> = f.headers.iter().collect();
    assert_eq!(h, [("a", "b:c"), ("", ""), ("empty", ""), ("", "noname")]);
}

#[test]
fn repeated_headers_are_kept_and_first_wins() {
    let f = one_frame(Version::V1_2, b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0");
    assert_eq!(f.get("foo"), Some("World"));
    assert_eq!(
        f.headers.get_all("foo").collect::<Vec<_>>(),
        ["World", "Hello"]
    );
}

#[test]
fn heart_beats_before_and_between_frames() {
    let mut codec = StompCodec::default();
    let items = decode_all(&mut codec, b"\n\r\nSEND\n\nA\0\n\nSEND\n\nB\0\r\n").unwrap();
    use Item::HeartBeat as HB;
    let send = |b: &'static [u8]| Item::Frame(Frame::new(Command::Send).with_body(b));
    assert_eq!(items, [HB, HB, send(b"A"), HB, HB, send(b"B"), HB]);
}

#[test]
fn lone_cr_waits_for_more_input() {
    let mut codec = StompCodec::default();
    let mut buf = BytesMut::from(&b"\r"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"\n");
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(Item::HeartBeat));
    assert!(buf.is_empty());
}

#[test]
fn content_length_body_may_contain_nul() {
    let f = one_frame(Version::V1_2, b"SEND\ncontent-length:5\n\na\0b\0c\0");
    assert_eq!(&f.body[..], b"a\0b\0c");
    assert_eq!(f.get("content-length"), Some("5"));
}

#[test]
fn zero_content_length() {
    let f = one_frame(Version::V1_2, b"SEND\ncontent-length:0\n\n\0");
    assert!(f.body.is_empty());
}

#[test]
fn only_first_content_length_counts() {
    let f = one_frame(
        Version::V1_2,
        b"SEND\ncontent-length:2\ncontent-length:junk\n\nab\0",
    );
    assert_eq!(&f.body[..], b"ab");
}

#[test]
fn body_without_content_length_ends_at_first_nul() {
    let mut codec = StompCodec::default();
    let items = decode_all(&mut codec, b"SEND\n\nab\0SEND\n\ncd\0").unwrap();
    let bodies: Vec<_> = frames(items).into_iter().map(|f| f.body).collect();
    assert_eq!(
        bodies,
        [Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]
    );
}

#[test]
fn byte_at_a_time_input() {
    let input = b"\nSEND\r\ndestination:/q\\c1\r\ncontent-length:3\r\n\r\nx\0y\0\nACK\nid:1\n\n\0";
    let mut codec = StompCodec::default();
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for &b in input.iter() {
        buf.extend_from_slice(&[b]);
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            items.push(item);
        }
    }
    assert!(buf.is_empty());
    let expected = vec![
        Item::HeartBeat,
        Item::Frame(
            Frame::new(Command::Send)
                .header("destination", "/q:1")
                .header("content-length", "3")
                .with_body(&b"x\0y"[..]),
        ),
        Item::HeartBeat,
        Item::Frame(Frame::new(Command::Ack).header("id", "1")),
    ];
    assert_eq!(items, expected);
}

#[test]
fn body_is_not_rescanned_when_arriving_in_chunks() {
    // The scan position survives across calls: after N chunks of a body
    // without content-length, `scanned` equals what has been buffered.
    let mut codec = StompCodec::default();
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    for i in 1..=100 {
        buf.extend_from_slice(&[b'x'; 1000]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(codec.scanned, i * 1000);
    }
    buf.extend_from_slice(b"\0");
    let f = frames(vec![codec.decode(&mut buf).unwrap().unwrap()]);
    assert_eq!(f[0].body.len(), 100_000);
}

#[test]
fn content_length_reserves_the_whole_body() {
    let mut codec = StompCodec::default();
    let mut buf = BytesMut::from(&b"SEND\ncontent-length:100000\n\nabc"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert!(buf.capacity() >= 100_001, "capacity {}", buf.capacity());
}

#[test]
fn connect_parses_before_version_is_set_and_is_not_unescaped() {
    let codec = StompCodec::default();
    assert_eq!(codec.version(), Version::V1_2);
    let f = one_frame(
        Version::V1_2,
        b"CONNECT\naccept-version:1.0,1.1,1.2\nhost:broker\nlogin:a\\b\n\n\0",
    );
    assert_eq!(f.command, Command::Connect);
    assert_eq!(f.get("accept-version"), Some("1.0,1.1,1.2"));
    // A backslash in CONNECT is literal, not an (invalid) escape.
    assert_eq!(f.get("login"), Some("a\\b"));
}

#[test]
fn eof_handling() {
    let mut codec = StompCodec::default();
    let mut buf = BytesMut::from(&b"\n"[..]);
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(Item::HeartBeat));
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);

    let mut buf = BytesMut::from(&b"SEND\n\nabc"[..]);
    let e = codec.decode_eof(&mut buf).unwrap_err();
    assert!(matches!(e, Error::Truncated), "{e:?}");
}

// ---- escaping ------------------------------------------------------------

#[test]
fn escaping_v1_2_decodes_all_four() {
    let f = one_frame(Version::V1_2, b"MESSAGE\na\\cb:1\\r2\\n3\\c4\\\\5\n\n\0");
    assert_eq!(f.get("a:b"), Some("1\r2\n3:4\\5"));
}

#[test]
fn escaping_v1_1_has_no_cr_escape() {
    let f = one_frame(Version::V1_1, b"MESSAGE\na\\cb:2\\n3\\c4\\\\5\n\n\0");
    assert_eq!(f.get("a:b"), Some("2\n3:4\\5"));
    let mut codec = StompCodec::default();
    codec.set_version(Version::V1_1);
    let e = decode_err(&mut codec, b"MESSAGE\na:1\\r2\n\n\0");
    assert!(matches!(&e, Error::InvalidEscape(s) if s == "\\r"), "{e:?}");
}

#[test]
fn escaping_v1_0_is_literal() {
    let f = one_frame(Version::V1_0, b"MESSAGE\na\\c:1\\r\\t\\\n\n\0");
    assert_eq!(f.get("a\\c"), Some("1\\r\\t\\"));
}

#[test]
fn undefined_escape_is_an_error_naming_it() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"SEND\nfoo:a\\tb\n\n\0");
    assert!(matches!(&e, Error::InvalidEscape(s) if s == "\\t"), "{e:?}");
    assert_eq!(e.to_string(), "invalid escape sequence \"\\\\t\" in header");

    let e = decode_err(&mut codec, b"SEND\nfoo:trailing\\\n\n\0");
    assert!(matches!(&e, Error::InvalidEscape(s) if s == "\\"), "{e:?}");

    let e = decode_err(&mut codec, b"SEND\nna\\xme:v\n\n\0");
    assert!(matches!(&e, Error::InvalidEscape(s) if s == "\\x"), "{e:?}");
}

#[test]
fn encoder_escapes_per_version() {
    let f = Frame::new(Command::Message).header("k:\\", "a\r\nb:c\\");
    assert_eq!(
        encode(Version::V1_2, &f),
        b"MESSAGE\nk\\c\\\\:a\\r\\nb\\cc\\\\\n\n\0"
    );
    assert_eq!(
        encode(Version::V1_1, &f),
        b"MESSAGE\nk\\c\\\\:a\r\\nb\\cc\\\\\n\n\0"
    );
    let f10 = Frame::new(Command::Message).header("k\\", "a:b\\c");
    assert_eq!(encode(Version::V1_0, &f10), b"MESSAGE\nk\\:a:b\\c\n\n\0");
}

#[test]
fn encoder_never_escapes_connect_and_connected() {
    for cmd in [Command::Connect, Command::Stomp, Command::Connected] {
        let f = Frame::new(cmd).header("passcode", "a\\b:c");
        let mut expected = cmd.as_str().as_bytes().to_vec();
        expected.extend_from_slice(b"\npasscode:a\\b:c\n\n\0");
        assert_eq!(encode(Version::V1_2, &f), expected);
        // ... and it reads back identically.
        assert_eq!(one_frame(Version::V1_2, &expected), f);
    }
}

#[test]
fn encoder_refuses_unrepresentable_headers() {
    let mut codec = StompCodec::default();
    let cases = [
        (
            Version::V1_0,
            Frame::new(Command::Message).header("a", "x\ny"),
        ),
        (
            Version::V1_0,
            Frame::new(Command::Message).header("a:b", "x"),
        ),
        (
            Version::V1_0,
            Frame::new(Command::Message).header("a", "x\r"),
        ),
        (
            Version::V1_1,
            Frame::new(Command::Message).header("a", "x\r"),
        ),
        (
            Version::V1_2,
            Frame::new(Command::Connected).header("a", "x\ny"),
        ),
    ];
    for (v, f) in cases {
        codec.set_version(v);
        let mut dst = BytesMut::from(&b"prefix"[..]);
        let e = codec.encode(&f, &mut dst).unwrap_err();
        assert!(matches!(e, Error::Unencodable { .. }), "{e:?}");
        assert!(e.to_string().contains("cannot be encoded"), "{e}");
        assert_eq!(&dst[..], b"prefix", "nothing written on refusal");
    }
    // 1.1 can carry a CR that is not at the end of a value.
    codec.set_version(Version::V1_1);
    let f = Frame::new(Command::Message).header("a", "x\ry");
    let mut dst = BytesMut::new();
    codec.encode(&f, &mut dst).unwrap();
    assert_eq!(frames(decode_all(&mut codec, &dst).unwrap()), [f]);
}

// ---- encoder -------------------------------------------------------------

#[test]
fn encoder_writes_content_length_for_non_empty_body() {
    let f = Frame::new(Command::Send)
        .header("destination", "/q")
        .header("content-length", "999")
        .with_body(&b"a\0b"[..]);
    assert_eq!(
        encode(Version::V1_2, &f),
        b"SEND\ndestination:/q\ncontent-length:3\n\na\0b\0"
    );
    // A stale content-length is dropped for an empty body too.
    let f = Frame::new(Command::Send).header("content-length", "5");
    assert_eq!(encode(Version::V1_2, &f), b"SEND\n\n\0");
}

#[test]
fn encoder_heart_beat_and_item() {
    let mut codec = StompCodec::default();
    let mut dst = BytesMut::new();
    codec.encode(Item::HeartBeat, &mut dst).unwrap();
    codec
        .encode(
            Item::from(Frame::new(Command::Receipt).header("receipt-id", "1")),
            &mut dst,
        )
        .unwrap();
    codec.encode(Frame::new(Command::Ack), &mut dst).unwrap();
    assert_eq!(&dst[..], b"\nRECEIPT\nreceipt-id:1\n\n\0ACK\n\n\0");
}

#[test]
fn error_frame_round_trips() {
    let e = Error::HeaderTooLong { limit: 10240 };
    let f = e.to_frame();
    let bytes = encode(Version::V1_2, &f);
    let back = one_frame(Version::V1_2, &bytes);
    assert_eq!(back.get("message"), Some("header line exceeds 10240 bytes"));
    assert_eq!(back.body, f.body);
}

// ---- errors --------------------------------------------------------------

#[test]
fn unknown_command() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"send\n\n\0");
    assert!(
        matches!(&e, Error::UnknownCommand(c) if c == "send"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "unknown command \"send\"");
}

#[test]
fn garbage_without_newline_is_rejected_early() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"GET / HTTP/1.1");
    assert!(
        matches!(&e, Error::UnknownCommand(c) if c == "GET / HTTP/1."),
        "{e:?}"
    );
}

#[test]
fn non_utf8_command_and_header() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"SE\xffND\n\n\0");
    assert!(matches!(e, Error::NotUtf8 { context: "command" }), "{e:?}");
    let e = decode_err(&mut codec, b"SEND\nk:\xc3\x28\n\n\0");
    assert!(matches!(e, Error::NotUtf8 { context: "header" }), "{e:?}");
    assert_eq!(e.to_string(), "header is not valid UTF-8");
}

#[test]
fn header_without_colon_names_the_line() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"SEND\ndestination/queue/a\n\n\0");
    assert!(
        matches!(&e, Error::InvalidHeader(l) if l == "destination/queue/a"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "malformed header line \"destination/queue/a\""
    );

    let long = format!("SEND\n{}\n\n\0", "x".repeat(500));
    let e = decode_err(&mut codec, long.as_bytes());
    let Error::InvalidHeader(l) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(l.chars().count(), 101, "truncated preview with ellipsis");
}

#[test]
fn invalid_content_length_values() {
    for v in ["-1", "+1", "abc", "", " 5", "5 ", "1.0", "0x10"] {
        let mut codec = StompCodec::default();
        let input = format!("SEND\ncontent-length:{v}\n\n\0");
        let e = decode_err(&mut codec, input.as_bytes());
        assert!(
            matches!(&e, Error::InvalidContentLength(s) if s == v),
            "{v}: {e:?}"
        );
        assert!(e.to_string().contains("invalid content-length"));
    }
}

#[test]
fn content_length_not_followed_by_nul() {
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"SEND\ncontent-length:2\n\nabc\0");
    assert!(matches!(e, Error::MissingNul), "{e:?}");
    assert_eq!(e.to_string(), "frame body not terminated by NUL");
}

#[test]
fn huge_content_length_fails_before_the_body_arrives() {
    // Only the header line is fed; the error must not wait for the body.
    let mut codec = StompCodec::default();
    let e = decode_err(&mut codec, b"SEND\ncontent-length:16777217\n");
    assert!(
        matches!(
            e,
            Error::FrameTooLarge {
                limit: 16_777_216,
                declared: Some(16_777_217)
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "frame exceeds 16777216 bytes");

    // Beyond u64 is also "too large", not "invalid".
    let mut codec = StompCodec::default();
    let e = decode_err(
        &mut codec,
        b"SEND\ncontent-length:99999999999999999999999\n",
    );
    assert!(
        matches!(
            e,
            Error::FrameTooLarge {
                declared: Some(u64::MAX),
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn content_length_counts_headers_towards_the_frame_limit() {
    let limits = Limits {
        max_frame_size: 40,
        ..Limits::default()
    };
    // "SEND\n" (5) + "content-length:30\n" (18) = 23; 23 + 30 > 40.
    let mut codec = StompCodec::new(limits);
    let e = decode_err(&mut codec, b"SEND\ncontent-length:30\n");
    assert!(
        matches!(
            e,
            Error::FrameTooLarge {
                declared: Some(30),
                ..
            }
        ),
        "{e:?}"
    );
    // 23 + 16 + blank line = 40 fits exactly.
    let mut codec = StompCodec::new(limits);
    let mut input = b"SEND\ncontent-length:16\n\n".to_vec();
    input.extend_from_slice(&[b'z'; 16]);
    input.push(0);
    assert_eq!(
        frames(decode_all(&mut codec, &input).unwrap())[0]
            .body
            .len(),
        16
    );
}

#[test]
fn nul_terminated_body_limit_fails_once_limit_is_buffered() {
    let mut codec = StompCodec::new(small_limits());
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]); // 6 bytes of the 64
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&[b'x'; 58]); // exactly at the limit: still fine
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"y"); // one more byte and no NUL
    let e = codec.decode(&mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            Error::FrameTooLarge {
                limit: 64,
                declared: None
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "frame exceeds 64 bytes");
}

#[test]
fn nul_terminated_body_at_limit_is_accepted() {
    let mut codec = StompCodec::new(small_limits());
    let mut input = b"SEND\n\n".to_vec();
    input.extend_from_slice(&[b'x'; 58]);
    input.push(0);
    assert_eq!(
        frames(decode_all(&mut codec, &input).unwrap())[0]
            .body
            .len(),
        58
    );
}

#[test]
fn header_line_too_long_without_eol() {
    let mut codec = StompCodec::new(small_limits());
    let mut buf = BytesMut::from(&b"SEND\n"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&[b'h'; 17]); // 16 + an optional CR could still be valid
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"h");
    let e = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(e, Error::HeaderTooLong { limit: 16 }), "{e:?}");
    assert_eq!(e.to_string(), "header line exceeds 16 bytes");
}

#[test]
fn header_line_length_boundaries() {
    // Exactly 16 bytes, with LF and with CRLF: accepted.
    for eol in ["\n", "\r\n"] {
        let input = format!("SEND\n{}{eol}\n\0", "k:".to_owned() + &"v".repeat(14));
        let mut codec = StompCodec::new(small_limits());
        assert_eq!(
            frames(decode_all(&mut codec, input.as_bytes()).unwrap()).len(),
            1
        );
    }
    // 17 bytes followed by an EOL: refused.
    let input = format!("SEND\nk:{}\n\n\0", "v".repeat(15));
    let mut codec = StompCodec::new(small_limits());
    let e = decode_err(&mut codec, input.as_bytes());
    assert!(matches!(e, Error::HeaderTooLong { .. }), "{e:?}");
}

#[test]
fn too_many_headers() {
    let mut codec = StompCodec::new(small_limits());
    assert!(decode_all(&mut codec, b"SEND\na:1\nb:2\nc:3\n\n\0").is_ok());
    let e = decode_err(&mut codec, b"SEND\na:1\nb:2\nc:3\nd:4\n");
    assert!(matches!(e, Error::TooManyHeaders { limit: 3 }), "{e:?}");
    assert_eq!(e.to_string(), "frame has more than 3 headers");
}

#[test]
fn header_block_counts_towards_frame_limit() {
    let limits = Limits {
        max_frame_size: 20,
        max_headers: 100,
        max_header_length: 100,
    };
    let mut codec = StompCodec::new(limits);
    let e = decode_err(&mut codec, b"SEND\naaaaaaaaaa:1\nb:2\n");
    assert!(matches!(e, Error::FrameTooLarge { limit: 20, .. }), "{e:?}");
}

#[test]
fn decoder_resets_after_an_error() {
    let mut codec = StompCodec::default();
    let _ = decode_err(&mut codec, b"SEND\nbad\n");
    let f = frames(decode_all(&mut codec, b"ACK\n\n\0").unwrap());
    assert_eq!(f, [Frame::new(Command::Ack)]);
}
