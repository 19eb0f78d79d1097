# vmm.run=poweroff: power off at once.
sync
poweroff -f
