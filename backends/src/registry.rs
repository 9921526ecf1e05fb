//! The registry macro: one list of backends (the `registry!`(crate::registry) invocation in
//! `lib.rs`) becomes everything that must know every backend — the names, the probe of each,
//! the dispatch of start and stop, and the start errors — so that nothing else lists them.

#[allow(unused_imports)] // for the intra-doc links
use crate::{Driver, Probed, Probes};

/// Defines, from one list of `field: Variant => Type`, the registry: [`BACKENDS`], [`Probes`]
/// with [`probe`], [`StartError`] and [`stop`].
macro_rules! registry {
    ($($(#[$doc:meta])* $field:ident : $Variant:ident => $ty:ty,)*) => {
        /// Every backend of this crate, in the order the registry lists them.
        pub const BACKENDS: [BackendId; [$(stringify!($field)),*].len()] =
            [$(<$ty as Driver>::ID),*];

        /// What probing every backend found: each one's [`Driver::probe`] answer, kept so
        /// that the selected backend starts from what its probe saw.
        #[derive(Clone, Copy)]
        pub struct Probes {
            $($(#[$doc])* $field: Result<<$ty as Driver>::Found, <$ty as Driver>::Absent>,)*
        }

        /// Probe every backend once.
        pub fn probe(detection: &Detection, platform: &dyn Platform) -> Probes {
            Probes { $($field: <$ty as Driver>::probe(detection, platform),)* }
        }

        impl Probes {
            /// Each backend's answer, for [`pvops::select()`].
            pub fn candidates(&self) -> [Candidate; BACKENDS.len()] {
                [$(Candidate {
                    id: <$ty as Driver>::ID,
                    serves: <$ty as Driver>::SERVES,
                    presence: match &self.$field {
                        Ok(found) => Presence::Present { base: Probed::base(found) },
                        Err(_) => Presence::Absent,
                    },
                },)*]
            }

            /// The backends that are absent, and why.
            pub fn absences(&self) -> impl Iterator<Item = Absence<'_>> {
                [$(match &self.$field {
                    Ok(_) => None,
                    Err(why) => Some(Absence {
                        id: <$ty as Driver>::ID,
                        refused: <$ty as Driver>::refused(why),
                        why,
                    }),
                },)*]
                .into_iter()
                .flatten()
            }

            /// Start backend `id` from what its probe found.
            pub fn start(
                &self,
                id: BackendId,
                detection: &Detection,
                platform: &dyn Platform,
            ) -> Result<&'static dyn pvops::Backend, StartError> {
                $(if id == <$ty as Driver>::ID {
                    let found = self.$field.map_err(|_| StartError::Absent(id))?;
                    return match <$ty as Driver>::start(found, detection, platform) {
                        Ok(b) => Ok(b),
                        Err(e) => Err(StartError::$Variant(e)),
                    };
                })*
                Err(StartError::Unknown(id))
            }
        }

        /// Why a backend could not be brought up.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum StartError {
            /// Its probe found its hypervisor absent.
            Absent(BackendId),
            /// No backend of that name in the registry.
            Unknown(BackendId),
            $(
                #[doc = concat!("The ", stringify!($field), " backend refused.")]
                $Variant(<$ty as Driver>::Error),
            )*
        }

        impl fmt::Display for StartError {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    StartError::Absent(id) => write!(f, "{id}: absent"),
                    StartError::Unknown(id) => write!(f, "{id}: no such backend"),
                    $(StartError::$Variant(e) => write!(f, "{}: {e}", stringify!($field)),)*
                }
            }
        }

        /// Backend `id` reads again what it keeps per CPU ([`Driver::refresh_cpus`]).
        pub fn refresh_cpus(id: BackendId, platform: &dyn Platform) {
            $(if id == <$ty as Driver>::ID {
                <$ty as Driver>::refresh_cpus(platform);
            })*
        }

        /// Release what backend `id`'s start set up (after its ops were uninstalled); says
        /// what was released.
        pub fn stop(id: BackendId, platform: &dyn Platform) -> &'static str {
            $(if id == <$ty as Driver>::ID {
                return <$ty as Driver>::stop(platform);
            })*
            "no such backend"
        }
    };
}
