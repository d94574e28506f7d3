//! What an MQTT 5 broker's PUBACK reason code means for the result it answers.
//!
//! A PUBACK is not always a yes: MQTT 5 (spec 3.4.2.1) lets the broker refuse a publish in its
//! acknowledgement, with a reason. rumqttc reports such a PUBACK like any other and only logs
//! a warning, so the reason must be read here, or an ACL's refusal would count as delivered.
//! MQTT 3.1.1 has no reason codes: a 3.1.1 broker that refuses acknowledges all the same.
//!
//! "Server busy" (0x89) is not a PUBACK code: it comes as a DISCONNECT, which is a lost
//! connection, and the publishes it held are retried like any other on the next one.

use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// How a refusal is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The broker has it.
    Accepted,
    /// Sending the same publish again can never be accepted: a dead letter.
    Permanent,
    /// The broker is shedding load: retry later, with backoff, without counting it against
    /// the result.
    Busy,
    /// Possibly passing: retry, counted against the result as any failed attempt is.
    Retry,
}

/// A publish the broker refused, with the reason code's name from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub verdict: Verdict,
}

/// Every PUBACK reason code, its name, and its verdict.
const PUBACK: [(PubAckReason, &str, Verdict); 9] = [
    (PubAckReason::Success, "success", Verdict::Accepted),
    // Accepted; nobody listens now, which is the upstream's business.
    (PubAckReason::NoMatchingSubscribers, "no matching subscribers", Verdict::Accepted),
    (PubAckReason::UnspecifiedError, "unspecified error", Verdict::Retry),
    (PubAckReason::ImplementationSpecificError, "implementation specific error", Verdict::Retry),
    (PubAckReason::NotAuthorized, "not authorized", Verdict::Permanent),
    (PubAckReason::TopicNameInvalid, "topic name invalid", Verdict::Permanent),
    (PubAckReason::PacketIdentifierInUse, "packet identifier in use", Verdict::Retry),
    (PubAckReason::QuotaExceeded, "quota exceeded", Verdict::Busy),
    (PubAckReason::PayloadFormatInvalid, "payload format invalid", Verdict::Permanent),
];

/// The answer a PUBACK with `reason` gives.
pub fn of_puback(reason: PubAckReason) -> Result<(), Refused> {
    let (_, name, verdict) =
        PUBACK.iter().find(|(r, ..)| *r == reason).copied().unwrap_or((reason, "unknown reason code", Verdict::Retry));
    match verdict {
        Verdict::Accepted => Ok(()),
        verdict => Err(Refused { reason: name, verdict }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_success_and_no_subscribers_are_accepted() {
        assert_eq!(of_puback(PubAckReason::Success), Ok(()));
        assert_eq!(of_puback(PubAckReason::NoMatchingSubscribers), Ok(()));
        let refused = of_puback(PubAckReason::NotAuthorized).unwrap_err();
        assert_eq!((refused.reason, refused.verdict), ("not authorized", Verdict::Permanent));
        assert_eq!(of_puback(PubAckReason::QuotaExceeded).unwrap_err().verdict, Verdict::Busy);
        let accepted = PUBACK.iter().filter(|(r, ..)| of_puback(*r).is_ok()).count();
        assert_eq!(accepted, 2);
    }
}
