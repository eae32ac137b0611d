//! Reading SVIDs: JWT-SVID validation against a bundle, X.509-SVID inspection.

pub mod audience;
pub mod jwt;
