//! SNR allocation (paper eq. 7-10). Being written.
