#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rwkv::fuzz::tokenizer_json(data));
