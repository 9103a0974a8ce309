package vvault.authz

# What each data class demands of the device (data.vvault.posture); classes not listed
# demand nothing.
requirement := data.vvault.posture[data_class]

device_ok if {
	input.device.verified == true
	count(device_short) == 0
}

device_short contains "unmanaged" if {
	requirement.managed
	not input.device.managed == true
}

device_short contains "unencrypted" if {
	requirement.disk_encrypted
	not input.device.disk_encrypted == true
}

device_short contains "unpatched" if {
	max := requirement.max_patch_age_days
	not input.device.patch_age_days <= max
}

deny contains "policy.device_required" if {
	requirement
	not device_ok
}
