"""``janus-hooks vm``: a libvirt definition for a new guest, already a managed janus-hooks VM.

``values`` checks what a person typed, ``request`` turns it and the host's facts into a ``VmPlan`` (pure),
``template`` assembles the domain XML from ``templates/libvirt/`` with ElementTree, ``unattend`` packs the
unattended-setup ISO, ``apply`` creates what the plan needs through libvirt and undoes it on failure.
"""
