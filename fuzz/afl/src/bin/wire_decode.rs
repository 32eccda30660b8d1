//! Input: one line as ipamd's socket would receive it. Crashes (panics) when the decoder panics,
//! or when a line it accepts does not encode back to the same request or response.

use underway_api::{Request, Response, WireError, decode, encode};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(line) = std::str::from_utf8(data) else { return };
        match decode::<Request>(line) {
            Ok(r) => assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r),
            Err(WireError::Version { got }) => assert_ne!(got, underway_api::API_VERSION),
            Err(WireError::Malformed(_)) => {}
        }
        if let Ok(r) = decode::<Response>(line) {
            assert_eq!(decode::<Response>(&encode(&r)).unwrap(), r);
        }
    });
}
