//! Any bytes as the filter's plugin configuration (`on_configure`): `config::parse` must
//! return Ok or Err, never panic. An accepted config must also be usable: every rule's
//! matcher is queried with a few paths.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = eventwire::config::parse(data) {
        assert!(cfg.max_body_bytes >= 1);
        assert!(!cfg.sidecar.upstream.is_empty());
        for path in ["/", "/orders", "/orders/1/items/2?x=1", "//", "/a%2Fb"] {
            let _ = cfg.find(Some("orders-placed"), "POST", path);
            let _ = cfg.find(None, "GET", path);
        }
        for rule in &cfg.rules {
            if let Some(p) = &rule.matcher.path {
                let _ = p.capture("/orders/x/y", "id");
            }
        }
    }
});
