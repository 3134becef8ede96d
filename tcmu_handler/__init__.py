"""The TCMU side: the kernel's command ring, the uio device, and the dispatcher that hands
each CDB to an iSCSI session (see ../shared/docs/tcmu-interface.md)."""
