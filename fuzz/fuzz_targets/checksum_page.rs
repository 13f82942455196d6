#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dovetail_backend::fuzzing::checksum_page(data));
