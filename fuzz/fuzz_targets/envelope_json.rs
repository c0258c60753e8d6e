//! Arbitrary bytes as the JSON form of a SignedEnvelope (HTTP gateway), and
//! as JSON envelope bytes.
#![no_main]

use fem_proto::{Envelope, Format, Signature, SignedEnvelope};
use libfuzzer_sys::fuzz_target;

fn check_open(s: &SignedEnvelope) {
    if let Ok(env) = s.open() {
        // Stable through postcard.
        let bytes = postcard::to_stdvec(&env).expect("a decoded envelope encodes");
        let back: Envelope = postcard::from_bytes(&bytes).expect("re-encoded envelope decodes");
        assert_eq!(back, env);
        // Stable through JSON when it came as JSON.
        if s.format == Format::Json {
            let json = serde_json::to_vec(&env).expect("JSON encodes");
            let back: Envelope = serde_json::from_slice(&json).expect("JSON form decodes");
            assert_eq!(back, env);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = serde_json::from_slice::<SignedEnvelope>(data) {
        // The JSON form round-trips exactly.
        let text = serde_json::to_vec(&s).expect("JSON encodes");
        let back: SignedEnvelope = serde_json::from_slice(&text).expect("JSON form decodes");
        assert_eq!(back, s);
        check_open(&s);
    }
    // The input as the bytes of a JSON-format envelope.
    check_open(&SignedEnvelope {
        format: Format::Json,
        bytes: data.to_vec(),
        signature: Signature([0; 64]),
    });
});
