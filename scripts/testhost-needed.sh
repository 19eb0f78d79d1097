# Sourced: sets in_testhost=1 when guests must run inside the test host
# (this machine's /dev/kvm is not hardware KVM: kvm_pvm cannot run guest
# user space), empty when they run right here. VMM_TESTHOST=1|0 forces it;
# the tests decide the same way (tests/src/host.rs).
hardware_kvm() {
	[ ! -e /sys/module/kvm_pvm ] && { [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; }
}
case "${VMM_TESTHOST:-auto}" in
1|on) in_testhost=1 ;;
0|off) in_testhost= ;;
*) if hardware_kvm; then in_testhost=; else in_testhost=1; fi ;;
esac
