//! A snapshot's `state` file (`vmm --restore`): the header and checksum,
//! the JSON of the whole VM, and every legacy device taking its saved
//! registers; plus the CPU-feature comparison a restore makes.
//!
//! The input is the file's body (the harness frames it, so that the fuzzer
//! spends its time past the checksum), or, when it starts with the magic,
//! the whole file. Checks: nothing panics; a state a device refuses leaves
//! it as it was (its saved state unchanged); a state a device takes, it
//! saves back unchanged (what a restore keeps, a next snapshot writes).
#![no_main]

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use devices::legacy::{AcpiPmDevice, I8042Device, Ib700Device, PvPanicDevice, SerialDevice};
use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{decode_state, encode_state, MAGIC};
use vmm::snapshot::kvm_state::missing_cpu_features;
use vmm::snapshot::VmSnapshot;
use vmm_fuzz::{irq, RecordingSink};

/// Restores `$state` into `$dev`; checks the refusal or the round trip.
macro_rules! check {
    ($dev:expr, $state:expr) => {{
        let mut dev = $dev;
        let before = dev.save_state();
        match dev.restore_state($state) {
            Ok(()) => assert_eq!(
                &dev.save_state(),
                $state,
                "a restored state saves back unchanged"
            ),
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "one line: {e}");
                assert_eq!(dev.save_state(), before, "a refused state changes nothing");
            }
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let file = if data.starts_with(MAGIC) {
        data.to_vec()
    } else {
        encode_state(data)
    };
    let Ok(body) = decode_state(&mut Cursor::new(file)) else {
        return;
    };
    let Ok(snap) = serde_json::from_slice::<VmSnapshot>(&body) else {
        return;
    };
    let sink = Arc::new(RecordingSink::default());
    let d = &snap.devices;
    check!(
        SerialDevice::new(irq(), Box::new(std::io::sink()), None),
        &d.serial
    );
    check!(I8042Device::new(irq(), sink.clone()), &d.i8042);
    check!(AcpiPmDevice::new(sink.clone()), &d.acpi_pm);
    check!(PvPanicDevice::new(sink.clone()), &d.pvpanic);
    check!(
        Ib700Device::new(Arc::new(|| Duration::from_secs(5)), Box::new(|_| {})),
        &d.watchdog
    );
    for cpu in &snap.cpus {
        let _ = missing_cpu_features(&cpu.cpuid, &[]);
    }
});
