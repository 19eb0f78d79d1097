# vmm.run=reboot: reboot at once (reboot=k on the cmdline: through the i8042).
sync
reboot -f
