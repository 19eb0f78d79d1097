use super::*;
use crate::legacy::test_util::{fired, irq, RecordingSink};
use crate::Bus;

/// A device with its interrupt and its event sink (also the state tests').
pub(super) fn dev() -> (I8042Device, EventFdTrigger, Arc<RecordingSink>) {
    let t = irq();
    let sink = Arc::new(RecordingSink::default());
    (I8042Device::new(t.clone(), sink.clone()), t, sink)
}

pub(super) fn status(d: &mut I8042Device) -> u8 {
    let mut b = [0];
    d.read(COMMAND_OFFSET, &mut b);
    b[0]
}

pub(super) fn data(d: &mut I8042Device) -> u8 {
    let mut b = [0];
    d.read(DATA_OFFSET, &mut b);
    b[0]
}

fn cmd(d: &mut I8042Device, c: u8) {
    d.write(COMMAND_OFFSET, &[c]);
}

fn put(d: &mut I8042Device, v: u8) {
    d.write(DATA_OFFSET, &[v]);
}

/// Issues a controller command and reads its one-byte reply by polling.
fn ask(d: &mut I8042Device, c: u8) -> u8 {
    cmd(d, c);
    assert_ne!(status(d) & STR_OBF, 0, "command {c:#x} should reply");
    data(d)
}

/// Reads everything the guest would, one byte per interrupt.
fn drain_by_irq(d: &mut I8042Device, t: &EventFdTrigger) -> Vec<u8> {
    let mut out = vec![];
    while fired(t) == 1 {
        assert_ne!(status(d) & STR_OBF, 0);
        out.push(data(d));
    }
    assert_eq!(status(d) & STR_OBF, 0);
    out
}

#[test]
fn power_on_status_and_command_byte() {
    let (mut d, t, _) = dev();
    let s = status(&mut d);
    assert_eq!(s & STR_OBF, 0);
    assert_ne!(s & STR_UNLOCKED, 0, "keylock must read as unlocked");
    assert_ne!(s & STR_SYS, 0);
    assert_eq!(ask(&mut d, CMD_READ_CTR), DEFAULT_CTR);
    assert_eq!(DEFAULT_CTR & CTR_XLATE, 0, "no translation: set 2");
    assert_ne!(status(&mut d) & STR_CMD, 0);
    assert_eq!(fired(&t), 0, "controller replies are polled");
}

#[test]
fn command_byte_write_then_read() {
    let (mut d, _, _) = dev();
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, 0x45);
    assert_eq!(status(&mut d) & STR_CMD, 0);
    assert_eq!(ask(&mut d, CMD_READ_CTR), 0x45);
    assert_eq!(d.command_byte(), 0x45);
}

#[test]
fn self_tests_pass() {
    let (mut d, _, _) = dev();
    assert_eq!(ask(&mut d, CMD_SELF_TEST), 0x55);
    assert_eq!(ask(&mut d, CMD_KBD_TEST), 0x00);
}

#[test]
fn newer_controller_reply_replaces_unread_one() {
    let (mut d, _, _) = dev();
    for _ in 0..1000 {
        cmd(&mut d, CMD_READ_CTR);
    }
    cmd(&mut d, CMD_SELF_TEST);
    assert_eq!(data(&mut d), 0x55);
    assert_eq!(status(&mut d) & STR_OBF, 0);
}

#[test]
fn disable_and_enable_keyboard_interface() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_KBD_DISABLE);
    assert_ne!(ask(&mut d, CMD_READ_CTR) & CTR_KBDDIS, 0);
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(fired(&t), 0, "interface disabled: keys wait");
    assert_eq!(status(&mut d) & STR_OBF, 0);
    cmd(&mut d, CMD_KBD_ENABLE);
    assert_eq!(ask(&mut d, CMD_READ_CTR) & CTR_KBDDIS, 0);
    assert_eq!(drain_by_irq(&mut d, &t), CTRL_ALT_DEL_SET2);
}

#[test]
fn output_port_and_reset_line() {
    let (mut d, _, sink) = dev();
    assert_eq!(ask(&mut d, CMD_READ_OUTP), DEFAULT_OUTP);
    // What Linux's i8042 driver does at init: A20 on, then a no-op.
    cmd(&mut d, CMD_WRITE_OUTP);
    put(&mut d, 0xdf);
    cmd(&mut d, 0xff);
    assert!(sink.take().is_empty());
    assert_eq!(ask(&mut d, CMD_READ_OUTP), 0xdf);
    // Writing the reset bit low resets.
    cmd(&mut d, CMD_WRITE_OUTP);
    put(&mut d, 0xde);
    assert_eq!(sink.take(), vec![GuestEvent::Reset(ResetCause::I8042)]);
}

#[test]
fn pulse_reset_command_resets() {
    let (mut d, _, sink) = dev();
    cmd(&mut d, 0xfe);
    assert_eq!(sink.take(), vec![GuestEvent::Reset(ResetCause::I8042)]);
    cmd(&mut d, 0xf0);
    assert_eq!(sink.take(), vec![GuestEvent::Reset(ResetCause::I8042)]);
    for c in [0xff, 0xfd, 0xf1] {
        cmd(&mut d, c);
    }
    // 0xfe written to the data port is a keyboard resend, not a reset.
    put(&mut d, 0xfe);
    assert!(sink.take().is_empty());
}

#[test]
fn write_keyboard_output_buffer_interrupts() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_WRITE_KBD_OBUF);
    put(&mut d, 0x42);
    assert_eq!(drain_by_irq(&mut d, &t), vec![0x42]);
}

#[test]
fn aux_parameters_are_swallowed() {
    let (mut d, t, _) = dev();
    for c in [CMD_WRITE_AUX, CMD_WRITE_AUX_OBUF] {
        cmd(&mut d, c);
        put(&mut d, 0xff);
    }
    assert_eq!(status(&mut d) & STR_OBF, 0, "no keyboard ACK for aux bytes");
    assert_eq!(fired(&t), 0);
    cmd(&mut d, CMD_AUX_DISABLE);
    assert_ne!(ask(&mut d, CMD_READ_CTR) & CTR_AUXDIS, 0);
    cmd(&mut d, CMD_AUX_ENABLE);
    assert_eq!(ask(&mut d, CMD_READ_CTR) & CTR_AUXDIS, 0);
}

#[test]
fn keyboard_commands_are_acked() {
    let (mut d, t, _) = dev();
    put(&mut d, 0xf6);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK]);
    put(&mut d, KBD_RESET);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK, KBD_BAT_OK]);
    put(&mut d, KBD_IDENTIFY);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK, 0xab, 0x83]);
    put(&mut d, KBD_ECHO);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ECHO]);
    // A parameter is acked, not run as a command.
    put(&mut d, KBD_SET_LEDS);
    put(&mut d, KBD_RESET);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK, KBD_ACK]);
    put(&mut d, KBD_SCANCODE_SET);
    put(&mut d, 0);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK, KBD_ACK, 2]);
}

#[test]
fn writing_to_keyboard_reenables_its_interface() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_KBD_DISABLE);
    put(&mut d, KBD_ENABLE);
    assert_eq!(d.command_byte() & CTR_KBDDIS, 0);
    assert_eq!(drain_by_irq(&mut d, &t), vec![KBD_ACK]);
}

#[test]
fn ctrl_alt_del_set2_one_interrupt_per_byte() {
    let (mut d, t, _) = dev();
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(d.pending_keyboard_bytes(), CTRL_ALT_DEL_SET2.len());
    // Polling status does not consume or re-raise.
    assert_eq!(fired(&t), 1);
    status(&mut d);
    assert_eq!(fired(&t), 0);
    let mut got = vec![data(&mut d)];
    got.extend(drain_by_irq(&mut d, &t));
    assert_eq!(
        got,
        [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
    );
    // Empty: the data port repeats the last byte, no more interrupts.
    assert_eq!(data(&mut d), 0x14);
    assert_eq!(fired(&t), 0);
}

#[test]
fn ctrl_alt_del_translated_to_set1_with_xlate() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, DEFAULT_CTR | CTR_XLATE);
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(
        drain_by_irq(&mut d, &t),
        [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
}

#[test]
fn masked_interrupt_is_raised_when_unmasked() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, CTR_SYS);
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(fired(&t), 0);
    // Still readable by polling.
    assert_ne!(status(&mut d) & STR_OBF, 0);
    assert_eq!(data(&mut d), 0x14);
    assert_eq!(fired(&t), 0);
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, CTR_SYS | CTR_KBDINT);
    assert_eq!(drain_by_irq(&mut d, &t), CTRL_ALT_DEL_SET2[1..]);
}

#[test]
fn controller_reply_comes_before_queued_keys() {
    let (mut d, t, _) = dev();
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(fired(&t), 1);
    assert_eq!(ask(&mut d, CMD_SELF_TEST), 0x55);
    // The first key's edge is still outstanding: no new one.
    assert_eq!(fired(&t), 0);
    let mut got = vec![data(&mut d)];
    got.extend(drain_by_irq(&mut d, &t));
    assert_eq!(got, CTRL_ALT_DEL_SET2);
}

#[test]
fn ctrl_alt_del_refused_when_scanning_disabled_or_full() {
    let (mut d, t, _) = dev();
    put(&mut d, KBD_DISABLE);
    drain_by_irq(&mut d, &t);
    assert_eq!(d.trigger_ctrl_alt_del(), Err(I8042Error::ScanningDisabled));
    put(&mut d, KBD_ENABLE);
    drain_by_irq(&mut d, &t);
    cmd(&mut d, CMD_KBD_DISABLE);
    d.trigger_ctrl_alt_del().unwrap();
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(d.trigger_ctrl_alt_del(), Err(I8042Error::BufferFull));
    assert_eq!(d.pending_keyboard_bytes(), 22);
}

#[test]
fn linux_init_sequence_then_ctrl_alt_del() {
    let (mut d, t, sink) = dev();
    // i8042_flush: nothing to read.
    assert_eq!(status(&mut d) & STR_OBF, 0);
    // Read CTR until two reads agree.
    let ctr = ask(&mut d, CMD_READ_CTR);
    assert_eq!(ask(&mut d, CMD_READ_CTR), ctr);
    // Disable the kbd port while setting up; direct mode (no XLATE).
    let ctr = (ctr | CTR_KBDDIS) & !(CTR_KBDINT | CTR_XLATE);
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, ctr);
    cmd(&mut d, CMD_WRITE_OUTP);
    put(&mut d, 0xdf);
    cmd(&mut d, 0xff);
    assert_eq!(ask(&mut d, CMD_SELF_TEST), 0x55);
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, ctr);
    // Enable the keyboard port.
    let ctr = (ctr & !CTR_KBDDIS) | CTR_KBDINT;
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, ctr);
    assert_eq!(fired(&t), 0);
    assert!(sink.take().is_empty());
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(drain_by_irq(&mut d, &t), CTRL_ALT_DEL_SET2);
}

#[test]
fn odd_sizes_and_offsets_have_no_effect() {
    let (mut d, t, sink) = dev();
    d.trigger_ctrl_alt_del().unwrap();
    fired(&t);
    let mut two = [0u8; 2];
    d.read(DATA_OFFSET, &mut two);
    assert_eq!(two, [0xff, 0xff]);
    for off in 1..=3 {
        let mut b = [0u8];
        d.read(off, &mut b);
        assert_eq!(b, [0xff]);
        d.write(off, &[0xfe]);
    }
    d.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
    d.write(COMMAND_OFFSET, &[]);
    d.read(DATA_OFFSET, &mut []);
    d.write(u64::MAX, &[0xfe]);
    assert!(sink.take().is_empty());
    assert_eq!(d.pending_keyboard_bytes(), CTRL_ALT_DEL_SET2.len());
    assert_eq!(data(&mut d), 0x14);
}

#[test]
fn reset_restores_power_on_state() {
    let (mut d, t, _) = dev();
    cmd(&mut d, CMD_WRITE_CTR);
    put(&mut d, 0x70);
    d.trigger_ctrl_alt_del().unwrap();
    d.reset();
    assert_eq!(d.command_byte(), DEFAULT_CTR);
    assert_eq!(d.pending_keyboard_bytes(), 0);
    assert_eq!(status(&mut d) & STR_OBF, 0);
    d.trigger_ctrl_alt_del().unwrap();
    assert_eq!(drain_by_irq(&mut d, &t), CTRL_ALT_DEL_SET2);
}

#[test]
fn split_ports_on_a_bus() {
    let (d, t, sink) = dev();
    let d = Arc::new(Mutex::new(d));
    let mut bus = Bus::new();
    bus.insert(
        Arc::new(Mutex::new(I8042Port::data(d.clone()))),
        I8042_DATA_PORT,
        1,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(I8042Port::command(d.clone()))),
        I8042_COMMAND_PORT,
        1,
    )
    .unwrap();
    let mut b = [0u8];
    assert!(!bus.read(0x61, &mut b), "0x61 stays free");
    assert!(bus.write(I8042_COMMAND_PORT, &[CMD_SELF_TEST]));
    assert!(bus.read(I8042_COMMAND_PORT, &mut b));
    assert_ne!(b[0] & STR_OBF, 0);
    assert!(bus.read(I8042_DATA_PORT, &mut b));
    assert_eq!(b[0], 0x55);
    lock(&d).trigger_ctrl_alt_del().unwrap();
    assert_eq!(fired(&t), 1);
    assert!(bus.read(I8042_DATA_PORT, &mut b));
    assert_eq!(b[0], 0x14);
    assert!(bus.write(I8042_COMMAND_PORT, &[0xfe]));
    assert_eq!(sink.take(), vec![GuestEvent::Reset(ResetCause::I8042)]);
}

/// The SysRq keys the control socket can send.
mod sysrq {
    use super::*;
    use crate::legacy::test_util::RecordingSink;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn read_all(dev: &mut I8042Device) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..64 {
            let mut st = [0u8];
            dev.read(COMMAND_OFFSET, &mut st);
            if st[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(DATA_OFFSET, &mut b);
            out.push(b[0]);
        }
        out
    }

    #[test]
    fn sysrq_queues_alt_sysrq_key_press_and_release_in_set2() {
        let irq = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap());
        let mut dev = I8042Device::new(irq.clone(), Arc::new(RecordingSink::default()));
        dev.trigger_sysrq('o').unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 1, "IRQ 1 raised");
        assert_eq!(
            read_all(&mut dev),
            vec![0x11, 0x84, 0x44, 0xf0, 0x44, 0xf0, 0x84, 0xf0, 0x11]
        );
    }

    #[test]
    fn unknown_sysrq_key_is_refused_and_queues_nothing() {
        let irq = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap());
        let mut dev = I8042Device::new(irq, Arc::new(RecordingSink::default()));
        assert_eq!(dev.trigger_sysrq('?'), Err(I8042Error::UnknownKey('?')));
        assert_eq!(dev.trigger_sysrq('B'), Err(I8042Error::UnknownKey('B')));
        assert_eq!(dev.pending_keyboard_bytes(), 0);
    }
}
