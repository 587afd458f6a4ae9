//! The node agent's socket protocol: one JSON request line as the agent decodes it
//! (`Request::decode`, what node-agent's server calls), and one reply line as the CNI plugin
//! decodes it. Nothing may panic, and whatever decodes must encode back to the same value.
#![no_main]

use ambient_net::proto::{Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads one line of text; the plugin reads the reply's bytes.
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(req) = Request::decode(line) {
            let again = serde_json::to_string(&req).expect("a request encodes");
            assert_eq!(Request::decode(&again).expect("re-decodes"), req);
        }
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(data) {
        let again = serde_json::to_vec(&reply).expect("a reply encodes");
        assert_eq!(
            serde_json::from_slice::<Reply>(&again).expect("re-decodes"),
            reply
        );
    }
});
