# vmm.run=devices: report what the kernel found.
echo "vmm-run: block: $(ls /sys/block 2>/dev/null | tr '\n' ' ')"
echo "vmm-run: net: $(ls /sys/class/net 2>/dev/null | tr '\n' ' ')"
echo "vmm-run: watchdog: $(ls /dev/watchdog* 2>/dev/null | tr '\n' ' ')"
echo "vmm-run: virtio: $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
echo "vmm-run: cpus: $(nproc) mem: $(free -m | awk '/Mem:/{print $2}') MiB"
