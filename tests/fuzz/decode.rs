//! Targets: the decode paths of both receivers (gRPC message, JSON body).

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use proptest::prelude::*;
use prost::Message;
use trainmetrics::decode::DecodeSettings;
use crate::harness::*;
use crate::strategies::*;


#[test]
fn grpc_message_decode() {
    let seeds = Arc::new(seeds());
    runner("proptest-regressions/fuzz-grpc_message_decode.txt", 50_000)
        .run(&input_bytes(seeds, false), |bytes| {
            let (req, peak) = peak_allocation(|| ExportMetricsServiceRequest::decode(bytes.as_slice()));
            prop_assert!(peak <= allocation_bound(bytes.len()), "decode of {} bytes allocated {peak}", bytes.len());
            if let Ok(req) = req {
                let (_, peak) = peak_allocation(|| check_decoder(&req, DecodeSettings::default()));
                prop_assert!(peak <= allocation_bound(bytes.len()), "batch decode of {} bytes allocated {peak}", bytes.len());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn json_body_decode() {
    let seeds = Arc::new(seeds());
    runner("proptest-regressions/fuzz-json_body_decode.txt", 50_000)
        .run(&input_bytes(seeds, true), |bytes| {
            let (req, peak) = peak_allocation(|| trainmetrics::receiver::http::decode_json(&bytes).map(|(r, _)| r));
            prop_assert!(peak <= allocation_bound(bytes.len()), "JSON decode of {} bytes allocated {peak}", bytes.len());
            if let Ok(req) = req {
                check_decoder(&req, DecodeSettings::default());
            }
            Ok(())
        })
        .unwrap();
}
