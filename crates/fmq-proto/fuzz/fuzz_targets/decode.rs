//! Feeds arbitrary bytes to the STOMP decoder in fuzzer-chosen chunks.
//!
//! The first two input bytes pick the version and the chunk-size seed, and
//! small limits make every limit path reachable with short inputs. Whatever
//! decodes must respect the limits and re-encode; whatever fails must render
//! an ERROR frame. Any panic is a bug.
#![no_main]

use bytes::BytesMut;
use fmq_proto::{Item, Limits, StompCodec, Version};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let [v, seed, rest @ ..] = data else {
        return;
    };
    let version = match v % 3 {
        0 => Version::V1_0,
        1 => Version::V1_1,
        _ => Version::V1_2,
    };
    let limits = Limits {
        max_frame_size: 512,
        max_headers: 16,
        max_header_length: 64,
    };
    let mut codec = StompCodec::new(limits);
    codec.set_version(version);

    let mut buf = BytesMut::new();
    let mut pos = 0;
    let mut step = usize::from(*seed);
    while pos < rest.len() {
        // Chunk sizes 1..=32 varying with a cheap LCG so the fuzzer
        // explores split points without spending input bytes on them.
        step = step.wrapping_mul(31).wrapping_add(7);
        let n = (step % 32 + 1).min(rest.len() - pos);
        buf.extend_from_slice(&rest[pos..pos + n]);
        pos += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Item::Frame(frame))) => {
                    assert!(frame.headers.len() <= limits.max_headers);
                    assert!(frame.body.len() <= limits.max_frame_size);
                    let mut out = BytesMut::new();
                    if codec.encode(&frame, &mut out).is_ok() {
                        // A frame we encoded must decode back to itself
                        // (plus the content-length the encoder adds).
                        let mut check = StompCodec::new(Limits::default());
                        check.set_version(version);
                        let back = check.decode(&mut out);
                        let Ok(Some(Item::Frame(mut back))) = back else {
                            panic!("re-encoded frame did not decode: {back:?}");
                        };
                        let mut want = frame.clone();
                        want.headers.remove("content-length");
                        back.headers.remove("content-length");
                        assert_eq!(back, want);
                    }
                }
                Ok(Some(Item::HeartBeat)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_frame();
                    return;
                }
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
