#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv::fuzz::checkpoint(data));
