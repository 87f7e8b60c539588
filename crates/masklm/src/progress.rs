//! indicatif progress bars behind the libraries' progress sinks (`masklm_data::Progress` for
//! corpora, `masklm_hub::DownloadProgress` for Hub downloads).

use indicatif::{ProgressBar, ProgressStyle};
use masklm_data::Progress;
use std::sync::Mutex;

/// A byte-counting progress bar with throughput in MB/s.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: Option<u64>) {
        let bar = match total {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new_spinner(),
        };
        let style = ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(what.to_string());
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(slot) = self.bar.lock()
            && let Some(bar) = slot.as_ref()
        {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Ok(mut slot) = self.bar.lock()
            && let Some(bar) = slot.take()
        {
            bar.finish_and_clear();
        }
    }
}

impl masklm_hub::DownloadProgress for Bar {
    fn start(&self, file: &str, total: u64) {
        Progress::start(self, file, Some(total));
    }

    fn advance(&self, bytes: u64) {
        Progress::advance(self, bytes);
    }

    fn finish(&self) {
        Progress::finish(self);
    }
}
