//! Customer events: `cdp.customer.CustomerEvent` (schemas/avro/customer-event.avsc).

use apache_avro::types::Value;

use super::common::{Amount, Envelope, Identifier, Sealed};
use crate::error::ContractError;
use crate::value::{self, avro_enum, AvroEnum, Fields};

/// An event about a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEvent {
    pub envelope: Envelope,
    pub payload: CustomerPayload,
}

impl CustomerEvent {
    /// Every identifier token the event names: its subject's, its identifiers', and an
    /// alias's previous id. An event naming an erased token belongs to an erased person.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        let previous = match &self.payload {
            CustomerPayload::Alias(a) => Some(a.previous.token.as_str()),
            _ => None,
        };
        self.envelope.tokens().chain(previous)
    }
}

/// The body of a customer event, one variant per branch of the `payload` union (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerPayload {
    Identify(Identify),
    Track(Track),
    PageViewed(PageViewed),
    ScreenViewed(ScreenViewed),
    Transaction(Transaction),
    ConsentChanged(ConsentChanged),
    Alias(Alias),
}

/// Profile traits asserted about the subject. PII is sealed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identify {
    pub first_name: Option<Sealed>,
    pub last_name: Option<Sealed>,
    pub email: Option<Sealed>,
    pub phone: Option<Sealed>,
    pub birth_date: Option<Sealed>,
    pub street: Option<Sealed>,
    pub city: Option<Sealed>,
    pub postal_code: Option<Sealed>,
    pub region: Option<Sealed>,
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    /// Sealed JSON object of the remaining traits.
    pub custom_traits: Option<Sealed>,
}

/// An interaction of the subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    pub interaction_type: String,
    pub channel: Option<String>,
    pub touchpoint: Option<String>,
    pub duration_ms: Option<i64>,
    pub outcome: Option<String>,
    /// Sealed JSON object.
    pub properties: Option<Sealed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageViewed {
    pub name: Option<String>,
    pub category: Option<String>,
    pub title: Option<Sealed>,
    pub url: Option<Sealed>,
    pub referrer: Option<Sealed>,
    pub properties: Option<Sealed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScreenViewed {
    pub name: Option<String>,
    pub category: Option<String>,
    pub properties: Option<Sealed>,
}

/// An order or payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Sealed.
    pub order_id: Option<Sealed>,
    pub status: TransactionStatus,
    pub amount: Amount,
    /// ISO 4217, upper case.
    pub currency: String,
    /// Sealed JSON array of [`LineItem::json`].
    pub line_items: Option<Sealed>,
    pub payment_method: Option<String>,
    /// Sealed.
    pub coupon: Option<Sealed>,
}

avro_enum! {
    pub enum TransactionStatus {
        Completed = "COMPLETED",
        Refunded = "REFUNDED",
        Cancelled = "CANCELLED",
        Pending = "PENDING",
    }
}

/// One line of an order, as the sealed `line_items` JSON holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub product_id: String,
    pub sku: Option<String>,
    pub name: Option<String>,
    pub category: Option<String>,
    pub quantity: i32,
    pub unit_price: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChanged {
    pub purpose: String,
    pub status: ConsentStatus,
    pub basis: LegalBasis,
    pub policy_version: Option<String>,
}

avro_enum! {
    pub enum ConsentStatus {
        Granted = "GRANTED",
        Denied = "DENIED",
        Withdrawn = "WITHDRAWN",
    }
}

avro_enum! {
    /// GDPR Art. 6 lawful basis for processing.
    pub enum LegalBasis {
        Consent = "CONSENT",
        Contract = "CONTRACT",
        LegalObligation = "LEGAL_OBLIGATION",
        VitalInterests = "VITAL_INTERESTS",
        PublicTask = "PUBLIC_TASK",
        LegitimateInterests = "LEGITIMATE_INTERESTS",
    }
}

/// The subject's previous identifier now means the same person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub previous: Identifier,
}

/// The PII fields of a payload, once for both borrows (`pii` and `pii_mut`).
macro_rules! customer_pii {
    ($payload:expr, $($m:ident)?) => {
        match $payload {
            Self::Identify(p) => vec![
                ("first_name", &$($m)? p.first_name),
                ("last_name", &$($m)? p.last_name),
                ("email", &$($m)? p.email),
                ("phone", &$($m)? p.phone),
                ("birth_date", &$($m)? p.birth_date),
                ("street", &$($m)? p.street),
                ("city", &$($m)? p.city),
                ("postal_code", &$($m)? p.postal_code),
                ("region", &$($m)? p.region),
                ("custom_traits", &$($m)? p.custom_traits),
            ],
            Self::Track(p) => vec![("properties", &$($m)? p.properties)],
            Self::PageViewed(p) => vec![
                ("title", &$($m)? p.title),
                ("url", &$($m)? p.url),
                ("referrer", &$($m)? p.referrer),
                ("properties", &$($m)? p.properties),
            ],
            Self::ScreenViewed(p) => vec![("properties", &$($m)? p.properties)],
            Self::Transaction(p) => vec![
                ("order_id", &$($m)? p.order_id),
                ("line_items", &$($m)? p.line_items),
                ("coupon", &$($m)? p.coupon),
            ],
            Self::ConsentChanged(_) | Self::Alias(_) => vec![],
        }
    };
}

impl CustomerPayload {
    pub(crate) const BRANCHES: usize = 7;

    /// The schema record name of this variant.
    pub fn record_name(&self) -> &'static str {
        match self {
            Self::Identify(_) => "Identify",
            Self::Track(_) => "Track",
            Self::PageViewed(_) => "PageViewed",
            Self::ScreenViewed(_) => "ScreenViewed",
            Self::Transaction(_) => "Transaction",
            Self::ConsentChanged(_) => "ConsentChanged",
            Self::Alias(_) => "Alias",
        }
    }

    /// Every field marked `"pii": true` in the schema, by field name.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<Sealed>)> {
        customer_pii!(self, mut)
    }

    /// The same fields as [`Self::pii_mut`], read only.
    pub fn pii(&self) -> Vec<(&'static str, &Option<Sealed>)> {
        customer_pii!(self,)
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Identify(_) => "customer.identify",
            Self::Track(_) => "customer.track",
            Self::PageViewed(_) => "customer.page_viewed",
            Self::ScreenViewed(_) => "customer.screen_viewed",
            Self::Transaction(_) => "customer.transaction",
            Self::ConsentChanged(_) => "customer.consent_changed",
            Self::Alias(_) => "customer.alias",
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let (i, v) = match self {
            Self::Identify(p) => (0, p.to_value()),
            Self::Track(p) => (1, p.to_value()),
            Self::PageViewed(p) => (2, p.to_value()),
            Self::ScreenViewed(p) => (3, p.to_value()),
            Self::Transaction(p) => (4, p.to_value()),
            Self::ConsentChanged(p) => (5, p.to_value()),
            Self::Alias(p) => (6, value::record(vec![("previous", p.previous.to_value())])),
        };
        Value::Union(i, Box::new(v))
    }

    pub(crate) fn from_branch(i: usize, v: Value) -> Result<Self, ContractError> {
        Ok(match i {
            0 => Self::Identify(Identify::from_fields(Fields::new("Identify", v)?)?),
            1 => Self::Track(Track::from_fields(Fields::new("Track", v)?)?),
            2 => Self::PageViewed(PageViewed::from_fields(Fields::new("PageViewed", v)?)?),
            3 => Self::ScreenViewed(ScreenViewed::from_fields(Fields::new("ScreenViewed", v)?)?),
            4 => Self::Transaction(Transaction::from_fields(Fields::new("Transaction", v)?)?),
            5 => Self::ConsentChanged(ConsentChanged::from_fields(Fields::new(
                "ConsentChanged",
                v,
            )?)?),
            _ => {
                let mut f = Fields::new("Alias", v)?;
                Self::Alias(Alias {
                    previous: Identifier::from_fields(f.record("previous", "Identifier")?)?,
                })
            }
        })
    }
}

impl Identify {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("first_name", value::sealed(&self.first_name)),
            ("last_name", value::sealed(&self.last_name)),
            ("email", value::sealed(&self.email)),
            ("phone", value::sealed(&self.phone)),
            ("birth_date", value::sealed(&self.birth_date)),
            ("street", value::sealed(&self.street)),
            ("city", value::sealed(&self.city)),
            ("postal_code", value::sealed(&self.postal_code)),
            ("region", value::sealed(&self.region)),
            ("country", value::opt_string(&self.country)),
            ("custom_traits", value::sealed(&self.custom_traits)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            first_name: f.sealed("first_name")?,
            last_name: f.sealed("last_name")?,
            email: f.sealed("email")?,
            phone: f.sealed("phone")?,
            birth_date: f.sealed("birth_date")?,
            street: f.sealed("street")?,
            city: f.sealed("city")?,
            postal_code: f.sealed("postal_code")?,
            region: f.sealed("region")?,
            country: f.opt_string("country")?,
            custom_traits: f.sealed("custom_traits")?,
        })
    }
}

impl Track {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("interaction_type", value::string(&self.interaction_type)),
            ("channel", value::opt_string(&self.channel)),
            ("touchpoint", value::opt_string(&self.touchpoint)),
            ("duration_ms", value::opt_long(self.duration_ms)),
            ("outcome", value::opt_string(&self.outcome)),
            ("properties", value::sealed(&self.properties)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            interaction_type: f.string("interaction_type")?,
            channel: f.opt_string("channel")?,
            touchpoint: f.opt_string("touchpoint")?,
            duration_ms: f.opt_long("duration_ms")?,
            outcome: f.opt_string("outcome")?,
            properties: f.sealed("properties")?,
        })
    }
}

impl PageViewed {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("name", value::opt_string(&self.name)),
            ("category", value::opt_string(&self.category)),
            ("title", value::sealed(&self.title)),
            ("url", value::sealed(&self.url)),
            ("referrer", value::sealed(&self.referrer)),
            ("properties", value::sealed(&self.properties)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            name: f.opt_string("name")?,
            category: f.opt_string("category")?,
            title: f.sealed("title")?,
            url: f.sealed("url")?,
            referrer: f.sealed("referrer")?,
            properties: f.sealed("properties")?,
        })
    }
}

impl ScreenViewed {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("name", value::opt_string(&self.name)),
            ("category", value::opt_string(&self.category)),
            ("properties", value::sealed(&self.properties)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            name: f.opt_string("name")?,
            category: f.opt_string("category")?,
            properties: f.sealed("properties")?,
        })
    }
}

impl Transaction {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("order_id", value::sealed(&self.order_id)),
            ("status", self.status.to_value()),
            ("amount", value::decimal(self.amount)),
            ("currency", value::string(&self.currency)),
            ("line_items", value::sealed(&self.line_items)),
            ("payment_method", value::opt_string(&self.payment_method)),
            ("coupon", value::sealed(&self.coupon)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            order_id: f.sealed("order_id")?,
            status: f.symbol("status")?,
            amount: f.decimal("amount")?,
            currency: f.string("currency")?,
            line_items: f.sealed("line_items")?,
            payment_method: f.opt_string("payment_method")?,
            coupon: f.sealed("coupon")?,
        })
    }
}

impl LineItem {
    /// The JSON array the sealed `line_items` field holds: per line `product_id`, `sku`,
    /// `name`, `category`, `quantity` and `unit_price` (a decimal string).
    pub fn json(items: &[LineItem]) -> String {
        serde_json::Value::Array(
            items
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "product_id": i.product_id,
                        "sku": i.sku,
                        "name": i.name,
                        "category": i.category,
                        "quantity": i.quantity,
                        "unit_price": i.unit_price.to_string(),
                    })
                })
                .collect(),
        )
        .to_string()
    }
}

impl ConsentChanged {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("purpose", value::string(&self.purpose)),
            ("status", self.status.to_value()),
            ("basis", self.basis.to_value()),
            ("policy_version", value::opt_string(&self.policy_version)),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            purpose: f.string("purpose")?,
            status: f.symbol("status")?,
            basis: f.symbol("basis")?,
            policy_version: f.opt_string("policy_version")?,
        })
    }
}
