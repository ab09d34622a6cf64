//! What an IP address is, for egress: public, or one of the special-purpose kinds a guest must
//! not reach. The ranges are data — two tables, read top to bottom, the first match wins — so
//! they can be reviewed as a list.
//!
//! An IPv6 address that carries an IPv4 address (IPv4-mapped `::ffff:0:0/96`, IPv4-translated
//! `::ffff:0:0:0/96`, IPv4-compatible `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged
//! as that IPv4 address: otherwise `::ffff:169.254.169.254` would be a way around the metadata
//! rule on any dual-stack socket, and `64:ff9b::a00:1` a way to `10.0.0.1` through a NAT64
//! gateway. IPv6 space that is neither listed nor global unicast (`2000::/3`) is unassigned and
//! counts as reserved: nothing a guest needs lives there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kind of an address, which decides whether a guest may ever reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddressClass {
    /// A cloud's instance metadata or host service: credentials live there.
    Metadata,
    /// `0.0.0.0`, `::`: "this host" to most stacks.
    Unspecified,
    /// `255.255.255.255`.
    Broadcast,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `169.254.0.0/16`, `fe80::/10`: the host's own link.
    LinkLocal,
    /// `100.64.0.0/10`: the carrier's or the host's side of shared address space.
    Cgnat,
    /// Special-purpose space that is not routed on the internet: documentation, benchmarking,
    /// future use, protocol assignments, unassigned IPv6.
    Reserved,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918, unique-local `fc00::/7` and deprecated site-local `fec0::/10`.
    Private,
    /// Anything else: the internet.
    Public,
}

/// Who may open a way to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A grant suffices.
    Granted,
    /// A grant that names the address literally, and the operator's `allow_private` list.
    OperatorListed,
    /// Nobody, whatever the grant or the host's configuration.
    Never,
}

impl AddressClass {
    /// Who may open a way to an address of this class.
    pub fn reach(self) -> Reach {
        match self {
            AddressClass::Public => Reach::Granted,
            AddressClass::Loopback | AddressClass::Private => Reach::OperatorListed,
            _ => Reach::Never,
        }
    }
}

/// The IPv4 ranges, most specific first.
const V4: &[(Ipv4Addr, u8, AddressClass)] = &[
    // Instance metadata: AWS, GCP, Azure, OpenStack, Oracle …
    (
        Ipv4Addr::new(169, 254, 169, 254),
        32,
        AddressClass::Metadata,
    ),
    // AWS ECS task metadata and credentials.
    (Ipv4Addr::new(169, 254, 170, 2), 32, AddressClass::Metadata),
    // Alibaba Cloud metadata (inside CGNAT space).
    (
        Ipv4Addr::new(100, 100, 100, 200),
        32,
        AddressClass::Metadata,
    ),
    // Azure WireServer: a public-looking address that is the host's own agent channel.
    (Ipv4Addr::new(168, 63, 129, 16), 32, AddressClass::Metadata),
    (
        Ipv4Addr::new(255, 255, 255, 255),
        32,
        AddressClass::Broadcast,
    ),
    (Ipv4Addr::new(0, 0, 0, 0), 32, AddressClass::Unspecified),
    // "This network" (RFC 791): Linux dials 0.0.0.0/8 as the local host.
    (Ipv4Addr::new(0, 0, 0, 0), 8, AddressClass::Reserved),
    (Ipv4Addr::new(10, 0, 0, 0), 8, AddressClass::Private),
    (Ipv4Addr::new(100, 64, 0, 0), 10, AddressClass::Cgnat),
    (Ipv4Addr::new(127, 0, 0, 0), 8, AddressClass::Loopback),
    (Ipv4Addr::new(169, 254, 0, 0), 16, AddressClass::LinkLocal),
    (Ipv4Addr::new(172, 16, 0, 0), 12, AddressClass::Private),
    // IETF protocol assignments (RFC 6890).
    (Ipv4Addr::new(192, 0, 0, 0), 24, AddressClass::Reserved),
    // TEST-NET-1, -2, -3 (RFC 5737).
    (Ipv4Addr::new(192, 0, 2, 0), 24, AddressClass::Reserved),
    (Ipv4Addr::new(198, 51, 100, 0), 24, AddressClass::Reserved),
    (Ipv4Addr::new(203, 0, 113, 0), 24, AddressClass::Reserved),
    // The deprecated 6to4 relay anycast (RFC 7526).
    (Ipv4Addr::new(192, 88, 99, 0), 24, AddressClass::Reserved),
    (Ipv4Addr::new(192, 168, 0, 0), 16, AddressClass::Private),
    // Benchmarking (RFC 2544).
    (Ipv4Addr::new(198, 18, 0, 0), 15, AddressClass::Reserved),
    (Ipv4Addr::new(224, 0, 0, 0), 4, AddressClass::Multicast),
    // Future use (RFC 1112).
    (Ipv4Addr::new(240, 0, 0, 0), 4, AddressClass::Reserved),
];

/// The IPv6 ranges that do not carry an IPv4 address, most specific first; anything outside
/// them and outside `2000::/3` is reserved.
const V6: &[(Ipv6Addr, u8, AddressClass)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, AddressClass::Unspecified),
    (Ipv6Addr::LOCALHOST, 128, AddressClass::Loopback),
    // AWS instance metadata over IPv6 (inside unique-local space).
    (
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        AddressClass::Metadata,
    ),
    // Local-use NAT64 (RFC 8215): a translator of the site's own choosing.
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        AddressClass::Reserved,
    ),
    // Discard-only (RFC 6666).
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        AddressClass::Reserved,
    ),
    // IETF protocol assignments, Teredo among them (RFC 6890).
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        23,
        AddressClass::Reserved,
    ),
    // Documentation (RFC 3849, RFC 9637).
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        AddressClass::Reserved,
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        AddressClass::Reserved,
    ),
    // Segment routing SIDs (RFC 9602).
    (
        Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0),
        16,
        AddressClass::Reserved,
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        AddressClass::Private,
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        AddressClass::LinkLocal,
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        AddressClass::Private,
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        AddressClass::Multicast,
    ),
    (
        Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0),
        3,
        AddressClass::Public,
    ),
];

/// The kind of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let bits = u32::from(ip);
    V4.iter()
        .find(|(net, len, _)| prefix_u32(bits, *len) == prefix_u32(u32::from(*net), *len))
        .map_or(AddressClass::Public, |(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let bits = u128::from(ip);
    V6.iter()
        .find(|(net, len, _)| prefix_u128(bits, *len) == prefix_u128(u128::from(*net), *len))
        .map_or(AddressClass::Reserved, |(_, _, class)| *class)
}

/// The IPv4 address an IPv6 address carries, for the forms a host may route to it: mapped,
/// translated, compatible (but not `::` and `::1`, which are IPv6's own), NAT64's well-known
/// prefix, and 6to4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low = Ipv4Addr::from(bits as u32);
    let s = ip.segments();
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, high, low16, ..] => {
            Some(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low16)))
        }
        _ => None,
    }
}

fn prefix_u32(bits: u32, len: u8) -> u32 {
    bits.checked_shr(32 - u32::from(len)).unwrap_or(0)
}

fn prefix_u128(bits: u128, len: u8) -> u128 {
    bits.checked_shr(128 - u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    /// Addresses, with their class: each range's first, last and a middle address, its
    /// neighbours just outside, and the IPv6 forms that embed an IPv4 address.
    const VECTORS: &[(&str, AddressClass)] = &[
        // Metadata, before the ranges around them.
        ("169.254.169.254", Metadata),
        ("169.254.170.2", Metadata),
        ("100.100.100.200", Metadata),
        ("168.63.129.16", Metadata),
        ("fd00:ec2::254", Metadata),
        ("169.254.169.253", LinkLocal),
        ("169.254.170.3", LinkLocal),
        ("100.100.100.201", Cgnat),
        ("168.63.129.17", Public),
        ("fd00:ec2::255", Private),
        // Unspecified, "this network", broadcast.
        ("0.0.0.0", Unspecified),
        ("0.0.0.1", Reserved),
        ("0.255.255.255", Reserved),
        ("::", Unspecified),
        ("255.255.255.255", Broadcast),
        ("255.255.255.254", Reserved),
        // Loopback.
        ("127.0.0.1", Loopback),
        ("127.0.0.0", Loopback),
        ("127.255.255.255", Loopback),
        ("126.255.255.255", Public),
        ("128.0.0.0", Public),
        ("::1", Loopback),
        // RFC 1918.
        ("10.0.0.0", Private),
        ("10.255.255.255", Private),
        ("9.255.255.255", Public),
        ("11.0.0.0", Public),
        ("172.16.0.0", Private),
        ("172.31.255.255", Private),
        ("172.15.255.255", Public),
        ("172.32.0.0", Public),
        ("192.168.0.0", Private),
        ("192.168.255.255", Private),
        ("192.167.255.255", Public),
        ("192.169.0.0", Public),
        // Link-local.
        ("169.254.0.0", LinkLocal),
        ("169.254.255.255", LinkLocal),
        ("169.253.255.255", Public),
        ("169.255.0.0", Public),
        ("fe80::1", LinkLocal),
        ("febf:ffff::1", LinkLocal),
        // CGNAT.
        ("100.64.0.0", Cgnat),
        ("100.127.255.255", Cgnat),
        ("100.63.255.255", Public),
        ("100.128.0.0", Public),
        // Multicast.
        ("224.0.0.1", Multicast),
        ("239.255.255.255", Multicast),
        ("223.255.255.255", Public),
        ("ff02::1", Multicast),
        ("ff0e::1", Multicast),
        // Reserved IPv4.
        ("192.0.0.8", Reserved),
        ("192.0.0.255", Reserved),
        ("192.0.1.0", Public),
        ("192.0.2.1", Reserved),
        ("198.51.100.7", Reserved),
        ("203.0.113.9", Reserved),
        ("192.88.99.1", Reserved),
        ("198.18.0.0", Reserved),
        ("198.19.255.255", Reserved),
        ("198.17.255.255", Public),
        ("198.20.0.0", Public),
        ("240.0.0.1", Reserved),
        ("254.255.255.255", Reserved),
        // Public IPv4.
        ("1.1.1.1", Public),
        ("8.8.8.8", Public),
        ("93.184.215.14", Public),
        // IPv6 private and reserved.
        ("fc00::1", Private),
        ("fdff:ffff::1", Private),
        ("fec0::1", Private),
        ("fbff:ffff::1", Reserved),
        ("100::1", Reserved),
        ("100:0:0:1::1", Reserved),
        ("2001::1", Reserved),
        ("2001:1ff::1", Reserved),
        ("2001:200::1", Public),
        ("2001:db8::1", Reserved),
        ("3fff::1", Reserved),
        ("5f00::1", Reserved),
        ("64:ff9b:1::1", Reserved),
        ("1::1", Reserved),
        ("4000::1", Reserved),
        ("e000::1", Reserved),
        // IPv6 public.
        ("2606:4700::1111", Public),
        ("2a00:1450:4001::1", Public),
        ("3ffe::1", Public),
        // IPv4-mapped.
        ("::ffff:127.0.0.1", Loopback),
        ("::ffff:169.254.169.254", Metadata),
        ("::ffff:10.1.2.3", Private),
        ("::ffff:0.0.0.0", Unspecified),
        ("::ffff:8.8.8.8", Public),
        // IPv4-translated (SIIT).
        ("::ffff:0:7f00:1", Loopback),
        ("::ffff:0:808:808", Public),
        // IPv4-compatible.
        ("::127.0.0.1", Loopback),
        ("::169.254.169.254", Metadata),
        ("::0.0.0.2", Reserved),
        ("::8.8.8.8", Public),
        // NAT64, well-known prefix.
        ("64:ff9b::a9fe:a9fe", Metadata),
        ("64:ff9b::10.0.0.1", Private),
        ("64:ff9b::8.8.8.8", Public),
        ("64:ff9b::1:0:0", Reserved),
        // 6to4.
        ("2002:7f00:1::", Loopback),
        ("2002:a9fe:a9fe::1", Metadata),
        ("2002:c0a8:101::1", Private),
        ("2002:808:808::1", Public),
        ("2002:6440::", Cgnat),
    ];

    #[test]
    fn every_vector_is_classified_as_recorded() {
        let wrong: Vec<String> = VECTORS
            .iter()
            .filter_map(|(text, want)| {
                let got = classify(text.parse().unwrap());
                (got != *want).then(|| format!("{text}: {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn only_public_addresses_are_reached_by_a_grant_and_only_loopback_and_private_by_the_operator()
    {
        for (text, class) in VECTORS {
            let reach = class.reach();
            match class {
                Public => assert_eq!(reach, Reach::Granted, "{text}"),
                Loopback | Private => assert_eq!(reach, Reach::OperatorListed, "{text}"),
                _ => assert_eq!(reach, Reach::Never, "{text}"),
            }
        }
    }

    #[test]
    fn an_embedded_ipv4_address_is_judged_as_itself_in_every_form() {
        for v4 in [
            "169.254.169.254",
            "127.0.0.1",
            "10.9.8.7",
            "100.64.0.1",
            "8.8.4.4",
        ] {
            let ip: Ipv4Addr = v4.parse().unwrap();
            let o = ip.octets();
            let (high, low) = (
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            );
            let want = classify(IpAddr::V4(ip));
            for v6 in [
                ip.to_ipv6_mapped(),
                ip.to_ipv6_compatible(),
                Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, high, low),
                Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, high, low),
                Ipv6Addr::new(0x2002, high, low, 0, 0, 0, 0, 1),
            ] {
                assert_eq!(classify(IpAddr::V6(v6)), want, "{v6} carries {v4}");
            }
        }
    }

    #[test]
    fn the_tables_list_each_range_by_its_first_address() {
        for (net, len, _) in V4 {
            assert_eq!(
                prefix_u32(u32::from(*net), *len) << (32 - len),
                u32::from(*net),
                "{net}/{len}"
            );
        }
        for (net, len, _) in V6 {
            assert_eq!(
                prefix_u128(u128::from(*net), *len) << (128 - len),
                u128::from(*net),
                "{net}/{len}"
            );
        }
    }
}
