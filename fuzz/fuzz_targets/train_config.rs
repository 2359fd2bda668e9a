#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv::fuzz::train_config(data));
