//! Request validation on any bytes a client can send: the protobuf decode, the shared checks,
//! and the bounded quoting of user input in messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rrt_proto::v1::GenerateRequest;
use rrt_service::validate;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = GenerateRequest::decode(data) else {
        return;
    };
    if let Err(rejection) = validate::generate_request(&req, 1024) {
        let status = tonic::Status::from(rejection);
        assert!(status.message().len() <= validate::MAX_MESSAGE_BYTES);
    }
    assert!(validate::quote(&req.prompt).len() <= 64 * 10 + 40);
    assert!(validate::quote(&req.model).len() <= 64 * 10 + 40);
});
