//! Parsing and error mapping of the admin API.

use super::*;

#[test]
fn selectors_are_sorted_deduplicated_and_required() {
    let got = parse_selectors(&[
        "unix:uid:1".into(),
        "unix:gid:2".into(),
        "unix:uid:1".into(),
    ])
    .unwrap();
    let got: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got, ["unix:gid:2", "unix:uid:1"]);
    assert!(parse_selectors(&[]).is_err());
    let err = parse_selectors(&["nocolon".into()]).unwrap_err();
    assert!(err.to_string().starts_with("selector: "), "{err}");
}

#[test]
fn dns_names_and_scopes_are_checked() {
    assert_eq!(
        parse_dns_names(&["API.example.com".into(), "*.svc".into()]).unwrap(),
        ["api.example.com", "*.svc"]
    );
    assert!(parse_dns_names(&["bad_name".into()]).is_err());
    assert!(parse_dns_names(&["-x.com".into()]).is_err());
    assert_eq!(
        parse_scopes(&["crm:read".into(), "calendar:*".into()]).unwrap(),
        ["calendar:*", "crm:read"]
    );
    assert!(parse_scopes(&["crm".into()]).is_err());
    assert!(parse_scopes(&["crm:re ad".into()]).is_err());
}

#[test]
fn authority_errors_map_to_status_codes_with_the_reason() {
    use crate::ca::CaError;
    let cases = [
        (
            CaError::UnknownAuthority { id: "abcd".into() },
            tonic::Code::NotFound,
            "abcd",
        ),
        (
            CaError::ActiveAuthority { id: "ef01".into() },
            tonic::Code::FailedPrecondition,
            "prepare",
        ),
        (
            CaError::AlreadyPrepared { id: "ef01".into() },
            tonic::Code::FailedPrecondition,
            "ef01",
        ),
        (
            CaError::NothingPrepared,
            tonic::Code::FailedPrecondition,
            "authority prepare",
        ),
        (
            CaError::InvalidSerial {
                serial: "zz".into(),
                reason: "not hexadecimal".into(),
            },
            tonic::Code::InvalidArgument,
            "zz",
        ),
    ];
    for (err, code, needle) in cases {
        let status = Status::from(AdminError::from(err));
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
}

#[test]
fn hint_and_owner_limits() {
    assert!(parse_hint(&"x".repeat(1025)).is_err());
    assert_eq!(parse_owner("").unwrap(), None);
    assert!(parse_owner("alice smith").is_err());
}
