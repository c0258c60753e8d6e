//! Arbitrary bytes into the frame decoder and the payload decoder.
//!
//! Whatever decodes must be stable: re-encoding a decoded frame and decoding
//! it again gives the same frame, and an envelope inside it that opens
//! survives a postcard round trip.
#![no_main]

use fem_proto::{
    FRAME_HEADER_LEN, Format, Frame, FrameDecoder, SignedEnvelope, decode_frame_payload,
    encode_frame,
};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fn check(frame: &Frame) {
    let mut buf = Vec::new();
    encode_frame(frame, &mut buf, usize::MAX).expect("a decoded frame encodes");
    let len = u32::from_be_bytes(buf[..FRAME_HEADER_LEN].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, buf.len() - FRAME_HEADER_LEN);
    let again = decode_frame_payload(&buf[FRAME_HEADER_LEN..]).expect("re-encoded frame decodes");
    assert_eq!(&again, frame);

    if let Frame::Envelope(s) | Frame::Deliver { envelope: s, .. } = frame {
        if let Ok(env) = s.open() {
            let bytes = postcard::to_stdvec(&env).expect("a decoded envelope encodes");
            let re = SignedEnvelope {
                format: Format::Postcard,
                bytes,
                signature: s.signature,
            };
            assert_eq!(re.open().expect("re-encoded envelope opens"), env);
            // Same through JSON when the envelope came as JSON (postcard text
            // is not validated, so its JSON form may legitimately differ).
            if s.format == Format::Json {
                let json = serde_json::to_vec(&env).expect("JSON encodes");
                let back: fem_proto::Envelope =
                    serde_json::from_slice(&json).expect("JSON form decodes");
                assert_eq!(back, env);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one payload.
    if let Ok(frame) = decode_frame_payload(data) {
        check(&frame);
    }

    // The whole input as a stream, pushed in two pieces (the first byte picks
    // the split) so partial headers and payloads are exercised.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut dec = FrameDecoder::new(MAX);
    for part in [&data[..split], &data[split..]] {
        dec.push(part);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => check(&frame),
                Ok(None) | Err(_) => break,
            }
        }
    }
});
