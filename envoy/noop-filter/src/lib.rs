//! A no-op proxy-wasm HTTP filter: reads one request header (`x-tenant`) and
//! continues. `envoy/bench.sh` uses it as the floor for any Wasm filter: what it
//! costs is the Wasm boundary alone (VM call per request, one host call).
//!
//! Calibration: with a plugin configuration `KIND:K` it also makes K extra
//! host calls of one kind per request, so the benchmark can measure what one
//! call of each kind tenantgate makes costs in Envoy's runtime:
//! `time`, `metric` (increment a counter), `add_header` (request),
//! `set_shared` (40 bytes), `get_header` (one header), `get_shared` (40
//! bytes), `property` (`source.address`), `header_map` (all request headers).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { calls: None, metric: 0 }) });
}}

#[derive(Clone, Copy)]
enum Kind {
    Time,
    Metric,
    AddHeader,
    SetShared,
    GetHeader,
    GetShared,
    Property,
    HeaderMap,
}

struct NoopRoot {
    calls: Option<(Kind, u32)>,
    metric: u32,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let Some((kind, k)) = config.trim().split_once(':') else {
            return true;
        };
        let kind = match kind {
            "time" => Kind::Time,
            "metric" => Kind::Metric,
            "add_header" => Kind::AddHeader,
            "set_shared" => Kind::SetShared,
            "get_header" => Kind::GetHeader,
            "get_shared" => Kind::GetShared,
            "property" => Kind::Property,
            "header_map" => Kind::HeaderMap,
            _ => return false,
        };
        let Ok(k) = k.parse::<u32>() else {
            return false;
        };
        self.metric = hostcalls::define_metric(MetricType::Counter, "noop_calibration").unwrap_or(0);
        let _ = hostcalls::set_shared_data("noop:calibration", Some(&[7u8; 40]), None);
        self.calls = Some((kind, k));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            calls: self.calls,
            metric: self.metric,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    calls: Option<(Kind, u32)>,
    metric: u32,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The one header read: keep the result alive so it is not optimized away.
        let tenant = self.get_http_request_header("x-tenant");
        std::hint::black_box(tenant);
        if let Some((kind, k)) = self.calls {
            for i in 0..k {
                match kind {
                    Kind::Time => {
                        let _ = std::hint::black_box(hostcalls::get_current_time());
                    }
                    Kind::Metric => {
                        let _ = hostcalls::increment_metric(self.metric, 1);
                    }
                    Kind::AddHeader => {
                        let name = format!("x-calibration-{i}");
                        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, &name, "v");
                    }
                    Kind::SetShared => {
                        let _ = hostcalls::set_shared_data("noop:calibration", Some(&[7u8; 40]), None);
                    }
                    Kind::GetHeader => {
                        std::hint::black_box(self.get_http_request_header("x-user"));
                    }
                    Kind::GetShared => {
                        std::hint::black_box(hostcalls::get_shared_data("noop:calibration").ok());
                    }
                    Kind::Property => {
                        std::hint::black_box(self.get_property(vec!["source", "address"]));
                    }
                    Kind::HeaderMap => {
                        std::hint::black_box(self.get_http_request_headers());
                    }
                }
            }
        }
        Action::Continue
    }
}
